"""``python -m sdgrpo ...``: the same as the ``sdgrpo`` command."""

import sys

from sdgrpo.cli import main

sys.exit(main())
