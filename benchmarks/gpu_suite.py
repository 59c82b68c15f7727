"""Run the GPU tests (``pytest -m gpu tests``) and record them as a results file: passed, failed, skipped, the suite's
wall time and every test's own time, with the common header (``common.header``).

    python benchmarks/gpu_suite.py OUT_DIR [--workers 6] [--timeout 400] [-k EXPR] [--tests tests]

The target (docs/gpu.md): the whole suite in one device call with room to spare, <= 300 s on one H100.
pytest's own junit XML is the record of each test; this file only counts it. At the timeout pytest is interrupted
(SIGINT, as Ctrl-C: it writes the XML of the tests that finished and its short summary of failures) and killed
GRACE_S later; each test's outcome is also printed as it finishes (``-v``), so a killed run's log still names them.
(A run on one H100, 2026-12-07, was killed at its timeout with four failures and no record of which.)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_tag, header, save  # noqa: E402

GRACE_S = 30  # after the SIGINT, for pytest (and xdist's workers) to stop and write the XML


def summarise(junit_xml: Path) -> dict:
    """Counts and per-test times from pytest's junit XML. A test is ``failed`` on <failure> or <error>, ``skipped``
    on <skipped> (pytest writes an xfail as a skip whose type is pytest.xfail), ``interrupted`` where it has no name
    (a run stopped at its timeout), else ``passed``."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "interrupted": 0}
    tests = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if case.get("name") is None:  # what pytest writes for the test that a Ctrl-C stopped
            counts["interrupted"] += 1
            continue
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                break
            if child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        counts[outcome] += 1
        name = f"{case.get('classname', '')}::{case.get('name')}"
        tests.append({"test": name, "outcome": outcome, "seconds": round(float(case.get("time", 0)), 2)})
    tests.sort(key=lambda t: -t["seconds"])
    return {**counts, "tests": tests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--workers", type=int, default=6, help="pytest-xdist workers on the one GPU")
    parser.add_argument("--timeout", type=int, default=400, help="seconds before the suite is stopped")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression (default: every GPU test)")
    parser.add_argument("--tests", default="tests", help="the test folder")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rf", "--tb=short", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *(["-n", str(args.workers)] if args.workers > 1 else []),
           *(["-k", args.select] if args.select else []), args.tests]
    start = time.perf_counter()
    # SIGINT back to its default in pytest's process: a parent that ignores it (a background job of a shell without
    # job control) passes that on, and Python then never raises KeyboardInterrupt for it
    proc = subprocess.Popen(cmd, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    timed_out = False
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)  # pytest's KeyboardInterrupt: the XML of what finished, then exit
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc = 124
    wall = time.perf_counter() - start
    row = {"variant": "pytest -m gpu" + (f" -k '{args.select}'" if args.select else ""), "exit_code": rc,
           "wall_s": round(wall, 1), "timed_out": timed_out}
    if xml.exists():
        row.update(summarise(xml))
    else:
        row["error"] = f"pytest wrote no junit XML (exit {rc})"
    config = {"selection": "pytest -m gpu tests", "workers": args.workers, "timeout_s": args.timeout,
              "k": args.select, "target_s": 300}
    payload = {**header("gpu_tests", config), "rows": [row]}
    save(f"gpu_tests_{device_tag()}_{payload['date'][:10]}", payload, out)
    print(f"gpu suite: {row.get('passed')} passed, {row.get('failed')} failed, {row.get('skipped')} skipped "
          f"in {wall:.0f} s (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
