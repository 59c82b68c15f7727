"""Time and peak memory of `sdgrpo prepare` on one large file against the same text as a folder of files.

    python benchmarks/bench_prepare.py OUT.json [--data ../shared/data] [--sizes_mb 12.5,50,200] [--folder_mb 50]
        [--folder_files 500] [--code_dir DIR]

The corpus is every .txt book under --data, concatenated and repeated until each size is reached (UTF-8, LF). Each
run is `python -m sdgrpo.cli prepare` in its own process; peak RSS is that process's maximum resident set size
(os.wait4). --code_dir runs another checkout's `src` (e.g. an older commit) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def corpus_text(data: Path) -> str:
    books = sorted(p for p in data.rglob("*.txt") if p.name != "SOURCE.txt" and "wikitext" not in str(p))
    return "\n\n".join(p.read_bytes().decode("utf-8-sig").replace("\r\n", "\n") for p in books)


def write_file(path: Path, text: str, megabytes: float) -> int:
    data = ((text + "\n\n") * (int(megabytes * 1e6) // len(text.encode()) + 1)).encode()[: int(megabytes * 1e6)]
    data = data[: data.rfind(b"\n\n")]  # end at a paragraph, never inside a UTF-8 sequence
    path.write_bytes(data)
    return len(data)


def write_folder(folder: Path, text: str, megabytes: float, files: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    data = ((text + "\n\n") * (int(megabytes * 1e6) // len(text.encode()) + 1)).encode()[: int(megabytes * 1e6)]
    size, start, total = len(data) // files, 0, 0
    for i in range(files):
        end = len(data) if i == files - 1 else data.rfind(b"\n\n", start, start + size) + 2
        (folder / f"part{i:04d}.txt").write_bytes(data[start:end])
        total += end - start
        start = end
    return total


def run_prepare(inputs: Path, out: Path, code_dir: Path | None) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if code_dir is not None:
        env["PYTHONPATH"] = str(code_dir / "src")
    log = out.with_suffix(".log")
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sdgrpo.cli", "prepare", str(inputs), "--output", str(out)],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed on {inputs}:\n{log.read_text()[-2000:]}")
    summary = json.loads((out / "prepare.json").read_text())
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "prompts": summary["prompts"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--sizes_mb", default="12.5,50,200")
    ap.add_argument("--folder_mb", type=float, default=50)
    ap.add_argument("--folder_files", type=int, default=500)
    ap.add_argument("--code_dir", default=None)
    args = ap.parse_args()
    text = corpus_text(Path(args.data))
    code_dir = Path(args.code_dir) if args.code_dir else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [(f"one file, {float(mb):g} MB", float(mb), None) for mb in args.sizes_mb.split(",") if mb]
        if args.folder_files:
            cases.append((f"{args.folder_files} files, {args.folder_mb:g} MB", args.folder_mb, args.folder_files))
        for name, mb, files in cases:
            src = tmp / f"in_{len(rows)}"
            if files:
                size = write_folder(src, text, mb, files)
            else:
                src = src.with_suffix(".txt")
                size = write_file(src, text, mb)
            result = run_prepare(src, tmp / f"out_{len(rows)}", code_dir)
            row = {"case": name, "bytes": size, **result, "mb_per_s": round(size / 1e6 / result["wall_s"], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            Path(args.out).write_text(json.dumps(meta(args) | {"rows": rows}, indent=2))


def meta(args) -> dict:
    import tokenizers

    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "tokenizers": tokenizers.__version__,
            "code": args.code_dir or "this checkout", "config": vars(args)}


if __name__ == "__main__":
    main()
