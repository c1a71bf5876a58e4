"""``eval.py``: score auto-vocabulary segmentation on a benchmark with LAVE-mapped names (see :mod:`autoseg.evaluate`).

Two modes: ``--predictions DIR`` scores saved ``infer.py`` outputs; without it the pipeline runs on the dataset's
images first (through the same run loop as ``infer.py``), writing its predictions beside the report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from autoseg.cli.common import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, add_device_args, add_pipeline_args, check_run_args


def build_parser() -> argparse.ArgumentParser:
    from autoseg.data.datasets import DATASETS
    from autoseg.data.video_datasets import VIDEO_DATASETS
    from autoseg.evaluate import MISSING_POLICIES
    from autoseg.lave import add_mapper_args
    from autoseg.metrics import ABSENT_RULES

    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Score auto-vocabulary segmentation on a benchmark with LAVE-mapped names (mIoU over the dataset).",
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=sorted(DATASETS) + sorted(VIDEO_DATASETS),
        help="benchmark (layouts: data/README.md); video-folder: clips, scored with mIoU and flicker",
    )
    p.add_argument("--root", required=True, help="dataset folder")
    p.add_argument("--split", default="val", help="dataset split (default: val)")
    p.add_argument(
        "--predictions",
        help="folder of infer.py outputs (NAME.png + NAME.json) to score; without it the pipeline runs on the dataset",
    )
    p.add_argument(
        "--save-predictions", help="pipeline mode: where to write predictions (default: <report>_predictions)"
    )
    p.add_argument("--skip-existing", action="store_true", help="pipeline mode: keep predictions already written")
    p.add_argument("--report", default="report.json", help="report JSON path; report.md and report_iou.png beside it")
    p.add_argument("--limit", type=int, help="score only the first N images")
    p.add_argument("--absent-rule", choices=ABSENT_RULES, default="mmseg", help="absent-class rule (default: mmseg)")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="miss", help="missing prediction: miss or error")
    p.add_argument("--tensorboard", help="also log the scalars to this TensorBoard folder")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_device_args(add_pipeline_args(p))  # --config, --blip, --segmenter, --seed, --device, ...; --devices
    return add_mapper_args(p)  # --mapper exact|embedding|llm, --mapper-cache, --embedding-*, --llm-*


def prediction_dir(args: argparse.Namespace) -> Path:
    """Pipeline mode's prediction folder: ``--save-predictions``, default ``<report>_predictions/``."""
    report = Path(args.report)
    return Path(args.save_predictions or report.with_name(report.stem + "_predictions"))


def _usage_checks(args: argparse.Namespace, stack: contextlib.ExitStack):
    """What can be checked before data or models load: numbers, the pipeline config, writable output folders.

    Returns the pipeline config and the entered prediction-folder :class:`RunManifest` (both None with
    ``--predictions``). Raises ValueError (or ``ModelLoadError``/``OSError``) with a one-line message.
    """
    from autoseg.cli.common import config_from_args
    from autoseg.config import to_dict
    from autoseg.outputs import RunManifest
    from autoseg.run import launch_rank
    from autoseg.utils.io import check_apart, prepare_output_dir

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    if args.dataset == "video-folder" and args.predictions is None:
        raise ValueError("--dataset video-folder scores saved clip predictions: give --predictions DIR")
    check_run_args(args)
    report_dir = Path(args.report).resolve().parent
    dataset = [args.root] if Path(args.root).is_dir() else []  # a missing root is reported when the data load
    check_apart(report_dir, dataset, "dataset", "report folder", may_contain=True)
    prepare_output_dir(report_dir, "report folder")
    if args.tensorboard:
        prepare_output_dir(args.tensorboard, "--tensorboard folder")
    if args.predictions is not None:
        return None, None
    check_apart(prediction_dir(args), dataset, "dataset", "predictions folder", may_contain=True)
    config = config_from_args(args)
    out_dir = prepare_output_dir(prediction_dir(args), "predictions folder")
    rank = launch_rank(args.devices, args.num_nodes)
    return config, stack.enter_context(RunManifest(out_dir, {"config": to_dict(config)}, rank=rank))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eval.py``: 0 ok, 2 usage error, 1 data error (one-line message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    from autoseg.data.datasets import build_dataset
    from autoseg.evaluate import evaluate_predictions, fmt, log_tensorboard, write_reports
    from autoseg.lave import MappingError, mapper_from_args
    from autoseg.models.loading import ModelLoadError
    from autoseg.run import segment_into

    with contextlib.ExitStack() as stack:
        try:
            config, run = _usage_checks(args, stack)
        except (ValueError, ModelLoadError, OSError) as e:
            parser.print_usage(sys.stderr)
            print(f"eval.py: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        try:
            if args.dataset == "video-folder":
                return _score_video(args, mapper_from_args(args))
            dataset = build_dataset(args.dataset, args.root, split=args.split, limit=args.limit)
            mapper = mapper_from_args(args)
            pred_dir = args.predictions
            if pred_dir is None:
                files = [(Path(s.image), Path(s.name)) for s in dataset.samples]
                entries = segment_into(
                    config, files, run, args.devices, args.num_nodes, args.skip_existing, args.max_pixels,
                    not args.no_progress,
                )  # fmt: skip
                if entries is None:  # a helper process of a multi-device run: rank 0 scores
                    return EXIT_OK
                failed = [e for e in entries if e["status"] != "ok"]
                if failed:  # scored as missing predictions, and listed in the report
                    print(
                        f"eval.py: {len(failed)} images could not be segmented, e.g. {failed[0].get('reason')}",
                        file=sys.stderr,
                    )
                pred_dir = run.out_dir
            report = evaluate_predictions(
                pred_dir, dataset, mapper, args.absent_rule, args.missing, not args.no_progress, args.mapper
            )
            paths = write_reports(report, args.report)
            if args.tensorboard:
                log_tensorboard(report, args.tensorboard)
        except ModelLoadError as e:
            print(f"eval.py: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except (OSError, ValueError, MappingError) as e:  # data, files, or a failed LAVE backend: one line, exit 1
            print(f"eval.py: error: {e}", file=sys.stderr)
            return EXIT_SOME_FAILED
    n_missing = len(report["missing_predictions"])
    print(
        f"{report['dataset']}: mIoU {fmt(report['mIoU'])}  pixel acc {fmt(report['pixel_acc'])}  "
        f"mean acc {fmt(report['mean_acc'])}  fwIoU {fmt(report['fwIoU'])}  over {report['n_images']} images "
        f"({n_missing} without a prediction, scored as unlabelled); report: {paths['json']}"
    )
    return EXIT_OK


def _score_video(args: argparse.Namespace, mapper) -> int:
    """``--dataset video-folder --predictions DIR``: mIoU and flicker (:mod:`autoseg.evaluate_video`)."""
    from autoseg.data.video_datasets import video_folder
    from autoseg.evaluate import fmt
    from autoseg.evaluate_video import evaluate_video_predictions, write_video_reports

    dataset = video_folder(args.root, limit=args.limit)
    report = evaluate_video_predictions(
        args.predictions, dataset, mapper, args.absent_rule, args.missing, not args.no_progress, args.mapper
    )
    paths = write_video_reports(report, dataset, args.report)
    print(
        f"{report['dataset']}: mIoU {fmt(report['mIoU'])}  flicker {fmt(report['flicker'])}  over "
        f"{report['n_clips']} clips, {report['n_frames']} frames ({len(report['missing_predictions'])} without a "
        f"prediction, scored as unlabelled); report: {paths['json']}"
    )
    return EXIT_OK
