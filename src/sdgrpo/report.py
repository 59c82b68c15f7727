"""Plots (PNG) and a Markdown report from metrics records and samples; no model is loaded here."""

from __future__ import annotations

import html
from pathlib import Path

CURVES = [("reward", "reward (mean log-prob under base)"), ("kl", "KL to base"),
          ("completions/mean_length", "completion length (tokens)")]


def plot_curves(rows: list[dict], path: str | Path, keys=CURVES) -> Path:
    """One panel per metric against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label in keys if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_before_after(before: list[float], after: list[float], path: str | Path) -> Path:
    """Histogram of per-sample rewards on held-out prompts, base model against trained adapters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    lo, hi = min(before + after), max(before + after)
    bins = [lo + (hi - lo) * i / 20 for i in range(21)]
    ax.hist(before, bins=bins, alpha=0.6, label="base")
    ax.hist(after, bins=bins, alpha=0.6, label="trained")
    ax.set_xlabel("reward of a held-out sample (mean log-prob under base)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", " ⏎ ")


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def samples_table(prompts: list[str], before: list[str], after: list[str], limit: int = 8) -> str:
    rows = [[_cell(p), _cell(b), _cell(a)] for p, b, a in list(zip(prompts, before, after))[:limit]]
    return markdown_table(["prompt", "base model", "trained adapters"], rows)
