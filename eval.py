"""Evaluate auto-vocabulary segmentation on a benchmark with LAVE-mapped names.

Score saved ``infer.py`` outputs::

    python eval.py --predictions out/ --dataset voc20 --root data/VOCdevkit --mapper exact --report report.json

Writes report.json, report.md and report_iou.png. See ``python eval.py --help`` and ``autoseg/evaluate.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from autoseg.evaluate import main as _main


def main(argv: Sequence[str] | None = None) -> int:
    """Run eval.py with ``argv`` (default: ``sys.argv[1:]``); returns the exit code (0 ok, 1 data error, 2 usage)."""
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
