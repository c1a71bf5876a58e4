"""Evaluation behind ``eval.py``: score open-vocabulary predictions against a benchmark with LAVE-mapped names.

Mode ``--predictions DIR``: read the ``infer.py`` outputs (``DIR/NAME.png`` + ``DIR/NAME.json``, see
:mod:`autoseg.outputs`) of every ground-truth image ``NAME`` of the dataset, map each unique generated name once to a
dataset class (or to background / void) with a LAVE mapper, turn each label map into dataset ids
(:func:`autoseg.metrics.to_dataset_ids`) and accumulate one confusion matrix (:class:`autoseg.metrics.DatasetIoU`).

A ground-truth image without a prediction is reported in ``missing_predictions`` and, by default (``--missing miss``),
scored as if the prediction left every pixel unlabelled: all misses, or all background where the dataset scores
background. ``--missing error`` makes it an error instead. No prediction matching any image name is always an error.

Outputs: ``report.json`` (figures in percent, NaN as null), ``report.md`` beside it and ``report_iou.png`` (per-class
IoU bars); scalars in TensorBoard with ``--tensorboard DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from autoseg.cli.infer import add_device_args, add_pipeline_args
from autoseg.config import to_dict
from autoseg.data.datasets import DATASETS, SegmentationDataset, build_dataset
from autoseg.lave import MappingError, add_mapper_args, mapper_from_args
from autoseg.metrics import ABSENT_RULES, DatasetIoU, to_dataset_ids
from autoseg.models.loading import ModelLoadError
from autoseg.outputs import RunManifest, prediction_files, read_prediction
from autoseg.outputs.files import read_vocabulary_record
from autoseg.utils.io import atomic_write, atomic_write_json, atomic_write_text, prepare_output_dir

MISSING_POLICIES = ("miss", "error")
MAX_BARS = 150


class NameMapper(Protocol):
    """What :func:`autoseg.lave.build_mapper` returns."""

    records: dict[str, dict]

    def map_names(self, names: Sequence[str], classes: Sequence[str], dataset: str) -> dict[str, int | None]: ...


def read_vocabulary(pred_dir: str | Path, stem: str) -> list[str] | None:
    """The vocabulary of prediction ``stem`` from its JSON, or None when the prediction is absent.

    The JSON is the last file infer.py writes for an image: a PNG without it is what a killed run leaves, and counts
    as no prediction.

    Raises:
        ValueError: the JSON exists but is malformed, or its PNG is missing.
    """
    files = prediction_files(pred_dir, stem)
    js, png = files["record"], files["label_map"]
    if not js.is_file():
        return None
    if not png.is_file():
        raise ValueError(f"{png}: prediction incomplete, {js.name} exists but its label map is missing")
    return read_vocabulary_record(js)


def _percent(x: float) -> float | None:
    return None if math.isnan(x) else 100.0 * x


def evaluate_predictions(
    pred_dir: str | Path,
    dataset: SegmentationDataset,
    mapper: NameMapper,
    absent_rule: str = "mmseg",
    missing: str = "miss",
    progress: bool = True,
    mapper_name: str | None = None,
) -> dict[str, Any]:
    """Score saved predictions on ``dataset``.

    Args:
        pred_dir: folder of ``infer.py`` outputs, named by the dataset's image names.
        dataset: the ground truth.
        mapper: LAVE name mapper (``map_names`` + ``records``).
        absent_rule: ``"mmseg"`` or ``"detectron2"`` (see :mod:`autoseg.metrics`).
        missing: ``"miss"`` (score a missing prediction as all unlabelled) or ``"error"``.
        progress: show tqdm bars.
        mapper_name: how the report names the mapper (default: its class name).

    Returns:
        the report dict (figures in percent, None for skipped classes); see the module docstring.

    Raises:
        FileNotFoundError / ValueError: missing folder, no matching prediction, malformed or wrong-size prediction.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: predictions folder not found (expected infer.py outputs NAME.png/.json)")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    names = dataset.names
    vocabularies: dict[str, list[str] | None] = {}
    for name in tqdm(names, desc="reading vocabularies", disable=not progress, leave=False):
        vocabularies[name] = read_vocabulary(pred_dir, name)
    missing_names = [n for n, v in vocabularies.items() if v is None]
    if len(missing_names) == len(names):
        raise ValueError(
            f"{pred_dir}: no prediction for any of the {len(names)} images of {dataset.name} "
            f"(e.g. expected {pred_dir / names[0]}.png); run infer.py on the dataset's image folder (data/README.md)"
        )
    if missing_names and missing == "error":
        raise ValueError(
            f"{pred_dir}: {len(missing_names)} of {len(names)} images have no prediction (e.g. {missing_names[:5]})"
        )

    unique = sorted({w for v in vocabularies.values() if v for w in v})
    mapping = dict(mapper.map_names(unique, dataset.classes, dataset.name))
    unmapped = [w for w in unique if w not in mapping]
    if unmapped:
        raise ValueError(f"the {type(mapper).__name__} mapper returned no class for {unmapped[:10]}")

    metric = DatasetIoU(dataset.num_classes, dataset.ignore_index, absent_rule)
    for i, name in enumerate(tqdm(names, desc=f"scoring {dataset.name}", disable=not progress)):
        gt = dataset.read_mask(i)
        if vocabularies[name] is None:
            label_map, vocabulary = np.zeros(gt.shape, dtype=np.int64), []
        else:
            label_map, vocabulary = read_prediction(pred_dir, name, vocabularies[name])
            if label_map.shape != gt.shape:
                raise ValueError(
                    f"{pred_dir / name}.png: prediction is {label_map.shape[1]}x{label_map.shape[0]} (WxH) but the "
                    f"ground truth {dataset.samples[i].mask} is {gt.shape[1]}x{gt.shape[0]}"
                )
        ids = to_dataset_ids(label_map, vocabulary, mapping, dataset.num_classes, dataset.background_index)
        metric.update(torch.from_numpy(ids), torch.from_numpy(gt))

    result = {k: v.numpy() for k, v in metric.compute().items()}
    classes = dataset.classes
    return {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "predictions": str(pred_dir),
        "mapper": mapper_name or type(mapper).__name__,
        "absent_rule": absent_rule,
        "mIoU": _percent(float(result["mIoU"])),
        "pixel_acc": _percent(float(result["pixel_acc"])),
        "mean_acc": _percent(float(result["mean_acc"])),
        "fwIoU": _percent(float(result["fwIoU"])),
        "per_class": {c: _percent(float(v)) for c, v in zip(classes, result["iou"], strict=True)},
        "per_class_acc": {c: _percent(float(v)) for c, v in zip(classes, result["acc"], strict=True)},
        "n_images": len(names),
        "n_scored_pixels": int(metric.confmat.sum()),
        "missing_predictions": missing_names,
        "missing_policy": missing,
        "mapping": {w: (None if mapping[w] is None else classes[mapping[w]]) for w in unique},
        "mapping_records": {w: _jsonable(r) for w, r in getattr(mapper, "records", {}).items() if w in mapping},
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """A markdown page: headline figures, per-class IoU / accuracy, and the name -> class mapping."""
    lines = [
        f"# {report['dataset']}: LAVE-mapped evaluation",
        "",
        f"Predictions `{report['predictions']}`, mapper `{report['mapper']}`, absent-class rule "
        f"`{report['absent_rule']}`, {report['n_images']} images, {len(report['missing_predictions'])} without a "
        f"prediction (scored as {'all unlabelled' if report['missing_policy'] == 'miss' else 'errors'}).",
        "",
        "| mIoU | pixel acc | mean acc | fwIoU |",
        "|---:|---:|---:|---:|",
        f"| {_fmt(report['mIoU'])} | {_fmt(report['pixel_acc'])} | {_fmt(report['mean_acc'])} | "
        f"{_fmt(report['fwIoU'])} |",
        "",
        "## Per class (%; `-` = skipped by the absent-class rule)",
        "",
        "| class | IoU | acc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {_fmt(v)} | {_fmt(report['per_class_acc'][c])} |" for c, v in report["per_class"].items()]
    lines += ["", "## Name mapping", "", "| name | class |", "|---|---|"]
    lines += [f"| {w} | {c if c is not None else '(background / void)'} |" for w, c in report["mapping"].items()]
    if report["missing_predictions"]:
        lines += ["", "## Images without a prediction", ""] + [f"- {n}" for n in report["missing_predictions"]]
    return "\n".join(lines) + "\n"


def save_iou_chart(report: Mapping[str, Any], path: str | Path) -> Path:
    """Horizontal bar chart of per-class IoU (scored classes, best first; the 75 best and worst past 150)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scored = sorted(((v, c) for c, v in report["per_class"].items() if v is not None), reverse=True)
    title = f"{report['dataset']}: per-class IoU, mIoU {_fmt(report['mIoU'])}"
    if len(scored) > MAX_BARS:
        title += f" ({MAX_BARS // 2} best and worst of {len(scored)})"
        scored = scored[: MAX_BARS // 2] + scored[-MAX_BARS // 2 :]
    fig = Figure(figsize=(8, max(2.5, 0.22 * len(scored) + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(range(len(scored)), [v for v, _ in scored], color="tab:blue")
    ax.set_yticks(range(len(scored)), [c for _, c in scored], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_reports(report: Mapping[str, Any], path: str | Path) -> dict[str, Path]:
    """Write ``path`` (JSON), ``path.md`` and ``path_iou.png`` atomically; returns the three paths."""
    path = Path(path)
    md, png = path.with_suffix(".md"), path.with_name(path.stem + "_iou.png")
    atomic_write_json(path, report)
    atomic_write_text(md, report_markdown(report))
    save_iou_chart(report, png)
    return {"json": path, "markdown": md, "chart": png}


def log_tensorboard(report: Mapping[str, Any], logdir: str | Path, step: int = 0) -> None:
    """Scalars ``eval/{dataset}/{mIoU,pixel_acc,mean_acc,fwIoU}`` and ``eval/{dataset}/iou/{class}``."""
    from torch.utils.tensorboard import SummaryWriter

    tag = f"eval/{report['dataset']}"
    with SummaryWriter(str(logdir)) as writer:
        for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
            if report[key] is not None:
                writer.add_scalar(f"{tag}/{key}", report[key], step)
        for c, v in report["per_class"].items():
            if v is not None:
                writer.add_scalar(f"{tag}/iou/{c}", v, step)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Score auto-vocabulary segmentation on a benchmark with LAVE-mapped names (mIoU over the dataset).",
    )
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="benchmark (layouts: data/README.md)")
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


def run_pipeline_mode(args: argparse.Namespace, dataset: SegmentationDataset, config, run: RunManifest) -> Path | None:
    """Mode (a): run the inference pipeline on the dataset's images, writing infer.py outputs to a folder.

    The folder (``run.out_dir``, see :func:`prediction_dir`) is then scored like ``--predictions``; with
    ``--skip-existing`` an interrupted run resumes where it stopped; ``--devices`` / ``--num-nodes`` share the images
    between processes. Returns the folder (None in the helper processes of a multi-device run).
    """
    from autoseg.cli.infer import segment_into

    files = [(Path(s.image), Path(s.name)) for s in dataset.samples]
    entries = segment_into(args, config, files, run, progress=not args.no_progress)
    if entries is None:
        return None
    failed = [e for e in entries if e["status"] != "ok"]
    if failed:  # scored as missing predictions, and listed in the report
        print(f"eval.py: {len(failed)} images could not be segmented, e.g. {failed[0].get('reason')}", file=sys.stderr)
    return run.out_dir


def _usage_checks(args: argparse.Namespace, stack: contextlib.ExitStack):
    """What can be checked before data or models load: numbers, the pipeline config, writable output folders.

    Returns the pipeline config and the entered prediction-folder :class:`RunManifest` (both None with
    ``--predictions``). Raises ValueError (or ``ModelLoadError``/``OSError``) with a one-line message.
    """
    from autoseg.cli.infer import check_run_args, config_from_args, launch_rank

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {args.limit}")
    check_run_args(args)
    prepare_output_dir(Path(args.report).resolve().parent, "report folder")
    if args.predictions is not None:
        return None, None
    config = config_from_args(args)
    out_dir = prepare_output_dir(prediction_dir(args), "predictions folder")
    return config, stack.enter_context(RunManifest(out_dir, {"config": to_dict(config)}, rank=launch_rank(args)))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``eval.py``: 0 ok, 2 usage error, 1 data error (one-line message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    with contextlib.ExitStack() as stack:
        try:
            config, run = _usage_checks(args, stack)
        except (ValueError, ModelLoadError, OSError) as e:
            parser.print_usage(sys.stderr)
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 2
        try:
            dataset = build_dataset(args.dataset, args.root, split=args.split, limit=args.limit)
            mapper = mapper_from_args(args)
            pred_dir = args.predictions
            if pred_dir is None:
                pred_dir = run_pipeline_mode(args, dataset, config, run)
                if pred_dir is None:  # a helper process of a multi-device run: rank 0 scores
                    return 0
            report = evaluate_predictions(
                pred_dir, dataset, mapper, args.absent_rule, args.missing, not args.no_progress, args.mapper
            )
            paths = write_reports(report, args.report)
            if args.tensorboard:
                log_tensorboard(report, args.tensorboard)
        except ModelLoadError as e:
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 2
        except (OSError, ValueError, MappingError) as e:  # data, files, or a failed LAVE backend: one line, exit 1
            print(f"eval.py: error: {e}", file=sys.stderr)
            return 1
    n_missing = len(report["missing_predictions"])
    print(
        f"{report['dataset']}: mIoU {_fmt(report['mIoU'])}  pixel acc {_fmt(report['pixel_acc'])}  "
        f"mean acc {_fmt(report['mean_acc'])}  fwIoU {_fmt(report['fwIoU'])}  over {report['n_images']} images "
        f"({n_missing} without a prediction, scored as unlabelled); report: {paths['json']}"
    )
    return 0
