"""Plots and Markdown tables of the reports (sdgrpo.report)."""

from __future__ import annotations

from sdgrpo.report import fmt, markdown_table, plot_before_after, plot_curves, samples_table

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_png_files(tmp_path):
    rows = [{"step": i, "reward": -3 + 0.1 * i, "kl": 0.01 * i, "collapse/distinct_2": 0.9 - 0.01 * i}
            for i in range(1, 6)]
    assert plot_curves(rows, tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert plot_before_after([-3.2, -3.0, -2.9], [-2.5, -2.4, -2.8], tmp_path / "ba.png").read_bytes()[:8] == PNG


def test_tables_escape_what_would_break_markdown():
    assert fmt(None) == "n/a" and fmt(-2.27149) == "-2.271" and fmt(1.5, 1) == "1.5"
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    table = samples_table(["a|b"], ["<i>x</i>\ny"], ["z"])
    assert table.splitlines()[2] == "| a\\|b | &lt;i&gt;x&lt;/i&gt; ⏎ y | z |"
