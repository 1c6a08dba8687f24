#!/usr/bin/env python
"""Run Synapse's experiment program from a checkout: ``python cli.py --help``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from synapse.experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
