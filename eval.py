"""Evaluate auto-vocabulary segmentation on a benchmark with LAVE-mapped names. Run `python eval.py --help`."""

import sys

from autoseg.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
