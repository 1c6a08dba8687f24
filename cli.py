#!/usr/bin/env python
"""Run Synapse's experiment program from a checkout: ``python cli.py --help``."""

import os
import signal
import sys


def _stopped_while_importing(signum, frame):
    """SIGINT/SIGTERM while Python imports torch (seconds), before main() installs its own handlers."""
    print(
        f"synapse: stopped by signal {signum} during start-up: nothing to save; the same command with --resume "
        "continues from the last checkpoint, or starts from scratch if there is none",
        file=sys.stderr,
    )
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stopped_while_importing)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from synapse.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
