"""One results file from the files of several calls of one benchmark on one warm machine (a call is limited in time,
so a run of many variants is split over calls): rows in the order given, the common header of the first file,
``command`` and ``date`` of every part under ``parts``. Refused, in one line, where the parts differ in benchmark,
device, library versions or config (other than the steps timed): rows of different runs are not comparable.

    python benchmarks/merge_results.py OUT.json PART.json [PART.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAME = ("benchmark", "device", "versions")


def _rows(part: dict) -> list[dict]:
    return part.get("results") or part.get("rows") or []


def merge(parts: list[dict]) -> dict:
    first = parts[0]
    for part in parts[1:]:
        for key in SAME:
            if part.get(key) != first.get(key):
                raise ValueError(f"{key} differs between the parts: {first.get(key)!r} and {part.get(key)!r}")
        a = {k: v for k, v in first["config"].items() if k != "steps_timed"}
        b = {k: v for k, v in part["config"].items() if k != "steps_timed"}
        if a != b:
            raise ValueError(f"config differs between the parts: {a!r} and {b!r}")
    rows = [row for part in parts for row in _rows(part)]
    key = "results" if "results" in first else "rows"
    return {**{k: v for k, v in first.items() if k not in ("results", "rows")},
            "command": " && ".join(p["command"] for p in parts),
            "parts": [{"date": p["date"], "commit": p.get("commit"), "command": p["command"],
                       "rows": [r.get("variant") or r.get("name") for r in _rows(p)]}
                      for p in parts],
            key: rows}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out, paths = Path(argv[0]), [Path(p) for p in argv[1:]]
    try:
        merged = merge([json.loads(p.read_text()) for p in paths])
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_results: {e}", file=sys.stderr)
        return 2
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{out}: {sum(len(p['rows']) for p in merged['parts'])} rows from {len(paths)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
