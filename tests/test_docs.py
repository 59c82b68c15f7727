"""README.md and docs/*.md: every relative link reaches a file in the repository (and, with a #fragment into a
Markdown file, one of its headings, slugged as GitHub does); the README and docs/gpu.md stay within their word
budgets (the README is a map, gpu.md a reference; the history is docs/LOG.md); the log's entries are dated, newest
first."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans, where brackets are code, not links."""
    return CODE.sub("", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, each space a hyphen; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file (or heading) does not exist, as written."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file, _, fragment = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            bad.append(target)
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(target)
    return bad


def words(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").split())  # as `wc -w` counts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file(page):
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "gpu.md").write_text("# GPU\n\n## Several GPUs: DDP, `FSDP2`\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("[a](docs/gpu.md) [b](docs/gpu.md#several-gpus-ddp-fsdp2) ![c](docs/none.png)\n"
                    "[d](docs/gpu.md#several-gpus) [e](https://example.org/x) [f](../outside.md) `[g](none.md)`\n"
                    "```\n[h](none.md)\n```\n", encoding="utf-8")
    (tmp_path.parent / "outside.md").write_text("x", encoding="utf-8")
    assert broken_links(page) == ["docs/none.png", "docs/gpu.md#several-gpus", "../outside.md"]


def test_repeated_headings_get_numbered_anchors(tmp_path):
    page = tmp_path / "LOG.md"
    page.write_text("# Log\n\n## 2026-12-06\n\n### 2026-12-06 · one H100 · a run\n\n## 2026-12-06\n", encoding="utf-8")
    assert anchors(page) == {"log", "2026-12-06", "2026-12-06-1", "2026-12-06--one-h100--a-run"}


def test_the_readme_and_the_gpu_reference_stay_within_their_word_budgets():
    assert words(ROOT / "README.md") < 1500
    assert words(ROOT / "docs" / "gpu.md") <= 2500


def test_the_log_is_dated_newest_first():
    """Every entry of docs/LOG.md (a ### heading) opens with its date, and the dates never rise down the page."""
    text = FENCE.sub("", (ROOT / "docs" / "LOG.md").read_text(encoding="utf-8"))
    entries = re.findall(r"^### (.*)$", text, re.M)
    dates = [re.match(r"(\d{4}-\d{2}-\d{2}) · ", e) for e in entries]
    assert len(entries) >= 20 and all(dates), [e for e, d in zip(entries, dates) if not d]
    dates = [d.group(1) for d in dates]
    assert dates == sorted(dates, reverse=True)


def test_no_module_of_the_library_outgrows_what_a_newcomer_can_hold():
    """No file in src/sdgrpo over ~400 lines (the engine and the GRPO hooks are packages of one concern a file)."""
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / "src" / "sdgrpo").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert long == {}
