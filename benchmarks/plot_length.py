"""Peak GPU memory and step time against completion length, from bench_step results files: one line per variant
(its ``lenN`` option dropped from the name), a point per length that ran; a length that failed (out of memory, or
stopped) is marked with an x at the top of the plot.

    python benchmarks/plot_length.py OUT.png RESULTS.json [RESULTS.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def series(paths: list[Path]) -> dict[str, list[tuple[int, dict]]]:
    """{variant without its length: [(completion tokens, row), ...] sorted by length}."""
    from bench_step import COMPLETION, variant_options

    out: dict[str, list[tuple[int, dict]]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for row in data["results"]:
            name, options = variant_options(row["variant"])
            length = options.get("len", data.get("config", {}).get("completion_tokens", COMPLETION))
            label = "+".join(p for p in row["variant"].split("+") if not p.startswith("len"))
            out.setdefault(label, []).append((length, row))
    return {k: sorted(v, key=lambda item: item[0]) for k, v in out.items()}


def mark_height(all_series: dict[str, list[tuple[int, dict]]]) -> float:
    """Where a length that did not run is marked: above every peak that ran, of any variant (one height for all, so
    the marks line up; a variant with no length that ran was marked at the bottom, 2026-12-08)."""
    return 1.05 * max([r["peak_gpu_gib"] for points in all_series.values() for _, r in points
                       if r.get("peak_gpu_gib") is not None and not r.get("error")] or [1])


def plot(paths: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, time) = plt.subplots(1, 2, figsize=(11, 4.2))
    all_series = series(paths)
    top = mark_height(all_series)
    for label, points in all_series.items():
        ran = [(n, r) for n, r in points if r.get("peak_gpu_gib") is not None and not r.get("error")]
        failed = [n for n, r in points if r.get("error") or r.get("peak_gpu_gib") is None]
        color = None
        if ran:
            line = mem.plot([n for n, _ in ran], [r["peak_gpu_gib"] for _, r in ran], marker="o", label=label)[0]
            time.plot([n for n, _ in ran], [r.get("cycle_mean_s") or r["step_s"] for _, r in ran], marker="o",
                      color=line.get_color(), label=label)
            color = line.get_color()
        if failed:
            mem.scatter(failed, [top] * len(failed), marker="x", color=color, s=60,
                        label=f"{label}: did not run" if not ran else None)
    mem.set(xlabel="completion tokens", ylabel="peak GPU memory (GiB)", xscale="log", title="memory")
    time.set(xlabel="completion tokens", ylabel="seconds a step", xscale="log", title="step time")
    for ax in (mem, time):
        ax.set_xticks(sorted({n for points in all_series.values() for n, _ in points}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())  # log scale's own labels overlap ours
        ax.grid(alpha=0.3)
    mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    plot([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))
