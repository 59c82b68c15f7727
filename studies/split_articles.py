"""Split a WikiText file by article into a training part and a held-out part (every 5th article held out).

    python studies/split_articles.py SRC OUT_TRAIN OUT_HELDOUT

An article starts at a line `` = Title = `` (one '=' on each side; sections have two or more).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sdgrpo.textio import read_text_file

TITLE = re.compile(r"^ = [^=].* = $")


def articles(text: str) -> list[str]:
    out: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if TITLE.match(line.rstrip("\n")) or not out:
            out.append([])
        out[-1].append(line)
    return ["".join(a) for a in out]


def main(src: str, train: str, heldout: str) -> None:
    parts = articles(read_text_file(src))
    held = [a for i, a in enumerate(parts) if i % 5 == 4]
    kept = [a for i, a in enumerate(parts) if i % 5 != 4]
    for path, chunk in ((train, kept), (heldout, held)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(chunk))
    print(f"{len(parts)} articles: {len(kept)} to {train}, {len(held)} to {heldout}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
