"""``python -m autoseg.export``: write an ``infer.py`` / ``eval.py`` prediction folder as COCO, COCO panoptic, Label
Studio, CVAT or AutoSeg ``folder`` labels, optionally with the names mapped onto a project's classes by LAVE."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from autoseg.cli.common import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    from autoseg.export import FORMATS
    from autoseg.lave import add_mapper_args

    p = argparse.ArgumentParser(
        prog="python -m autoseg.export",
        description="Turn infer.py outputs (NAME.png + NAME.json) into labels an annotation tool or a trainer reads. "
        "DEST is a new folder holding the format's files and summary.json.",
    )
    p.add_argument("predictions", type=Path, metavar="PRED_DIR", help="an infer.py / eval.py predictions folder")
    p.add_argument("--to", required=True, choices=list(FORMATS), metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, type=Path, metavar="DEST", help="the folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing DEST (only once the export is complete)")
    p.add_argument(
        "--classes", type=Path, metavar="FILE", help="classes.txt (one class per line): map every name onto these"
    )
    p.add_argument("--keep-unmapped", action="store_true", help="with --classes: keep names without a class as such")
    p.add_argument(
        "--min-area", type=int, default=0, metavar="PIXELS", help="drop connected regions of fewer pixels (default 0)"
    )
    p.add_argument("--image-url", metavar="PREFIX", help="labelstudio: image URL = PREFIX + relative file name")
    p.add_argument("--images", type=Path, metavar="DIR", help="folder: the image folder infer.py read")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return add_mapper_args(p)  # --mapper exact|embedding|llm, --mapper-cache, --embedding-*, --llm-* as in eval.py


def main(argv: Sequence[str] | None = None) -> int:
    """Export; 0 when every prediction set was exported, 1 when some were skipped (listed), 2 on usage errors."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    from autoseg.data.datasets import read_class_list
    from autoseg.export import export_predictions
    from autoseg.lave import MappingError, mapper_from_args

    try:
        classes = read_class_list(args.classes) if args.classes is not None else None
        mapper = mapper_from_args(args) if classes is not None else None
        report = export_predictions(
            args.predictions, args.to, args.out, classes=classes, mapper=mapper, mapper_name=args.mapper,
            keep_unmapped=args.keep_unmapped, min_area=args.min_area, force=args.force,
            options={"image_url": args.image_url, "image_root": args.images}, progress=not args.no_progress,
        )  # fmt: skip
    except (OSError, ValueError, MappingError) as e:
        print(f"autoseg.export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(report["text"])
    return EXIT_SOME_FAILED if report["images_skipped"] else EXIT_OK
