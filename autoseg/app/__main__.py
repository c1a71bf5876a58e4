"""``python -m autoseg.app``: the demo page (its command line is :mod:`autoseg.cli.app`)."""

import sys

from autoseg.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
