"""Scoring behind ``eval.py`` (its command line is :mod:`autoseg.cli.eval`): open-vocabulary predictions against a
benchmark with LAVE-mapped names.

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

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from autoseg.data.datasets import SegmentationDataset
from autoseg.metrics import DatasetIoU, to_dataset_ids
from autoseg.outputs import prediction_files, read_prediction
from autoseg.outputs.files import read_vocabulary_record
from autoseg.utils.io import atomic_write, atomic_write_json, atomic_write_text

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


def percent(x: float) -> float | None:
    return None if math.isnan(x) else 100.0 * x


def map_vocabularies(unique: list[str], mapper: NameMapper, classes: list[str], dataset: str) -> dict[str, int | None]:
    """Each of the ``unique`` predicted names -> class index (None: no class), by the LAVE mapper.

    Raises:
        ValueError: the mapper returned no decision for some name.
    """
    mapping = dict(mapper.map_names(unique, classes, dataset))
    unmapped = [w for w in unique if w not in mapping]
    if unmapped:
        raise ValueError(f"the {type(mapper).__name__} mapper returned no class for {unmapped[:10]}")
    return mapping


def score_figures(metric: DatasetIoU, classes: list[str]) -> dict[str, Any]:
    """The report's figures of a filled metric, in percent (None for skipped classes)."""
    result = {k: v.numpy() for k, v in metric.compute().items()}
    return {
        "mIoU": percent(float(result["mIoU"])),
        "pixel_acc": percent(float(result["pixel_acc"])),
        "mean_acc": percent(float(result["mean_acc"])),
        "fwIoU": percent(float(result["fwIoU"])),
        "per_class": {c: percent(float(v)) for c, v in zip(classes, result["iou"], strict=True)},
        "per_class_acc": {c: percent(float(v)) for c, v in zip(classes, result["acc"], strict=True)},
    }


def mapping_figures(mapping: dict[str, int | None], unique: list[str], classes: list[str], mapper) -> dict[str, Any]:
    """The report's name mapping: each name's class (None: none) and the mapper's records of those names."""
    return {
        "mapping": {w: (None if mapping[w] is None else classes[mapping[w]]) for w in unique},
        "mapping_records": {w: _jsonable(r) for w, r in getattr(mapper, "records", {}).items() if w in mapping},
    }


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
    mapping = map_vocabularies(unique, mapper, dataset.classes, dataset.name)

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

    return {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "predictions": str(pred_dir),
        "mapper": mapper_name or type(mapper).__name__,
        "absent_rule": absent_rule,
        **score_figures(metric, dataset.classes),
        "n_images": len(names),
        "n_scored_pixels": int(metric.confmat.sum()),
        "missing_predictions": missing_names,
        "missing_policy": missing,
        **mapping_figures(mapping, unique, dataset.classes, mapper),
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def fmt(x: float | None) -> str:
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
        f"| {fmt(report['mIoU'])} | {fmt(report['pixel_acc'])} | {fmt(report['mean_acc'])} | {fmt(report['fwIoU'])} |",
        "",
        "## Per class (%; `-` = skipped by the absent-class rule)",
        "",
        "| class | IoU | acc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {fmt(v)} | {fmt(report['per_class_acc'][c])} |" for c, v in report["per_class"].items()]
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
    title = f"{report['dataset']}: per-class IoU, mIoU {fmt(report['mIoU'])}"
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
