"""``python -m sdgrpo.cli VERB ARGS`` with :mod:`exit_watch` attached, for tests that check how the processes of a
multi-process launch end.

    python tests/probes/cli_probe.py PROBE_DIR VERB ARGS...
"""

from __future__ import annotations

import sys

from exit_watch import watch

if __name__ == "__main__":
    watch(sys.argv[1])
    from sdgrpo.cli import main

    sys.exit(main(sys.argv[2:]))
