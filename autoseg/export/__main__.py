"""``python -m autoseg.export``: export infer.py outputs (its command line is :mod:`autoseg.cli.export`)."""

import sys

from autoseg.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
