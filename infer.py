"""Segment your own images with an automatically found vocabulary. Run `python infer.py --help`."""

import sys

from autoseg.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
