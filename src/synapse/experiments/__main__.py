"""``python -m synapse.experiments``: the experiment program (the same as ``synapse`` and ``python cli.py``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
