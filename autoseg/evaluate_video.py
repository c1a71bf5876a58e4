"""Scoring of video predictions behind ``eval.py --dataset video-folder``: mIoU over all frames and flicker.

Predictions of clip ``NAME`` (``infer.py`` outputs) are label maps ``PRED/NAME/000000.png ...`` (frame index, 6 digits;
0 = unlabelled, ``i`` = ``i``-th name) with either

- one clip vocabulary in ``PRED/NAME.json`` (what ``infer.py`` writes for a video or a ``--clips`` folder), or
- a vocabulary per frame in ``PRED/NAME/000000.json ...`` (what ``infer.py`` writes when it segments the frames of
  ``ROOT/frames/`` as separate images: the per-frame baseline).

Every name is mapped once to a dataset class with the same LAVE mapper as image scoring, each label map becomes
dataset ids (:func:`autoseg.metrics.to_dataset_ids`) and one confusion matrix over all annotated frames gives mIoU.

``flicker``: over every pair of annotated frames ``t`` and ``t + 1`` of a clip, among the pixels whose true class is
the same (and not ignored) in both frames, the fraction whose predicted *dataset class* changes (unlabelled and names
mapped to nothing count as one "void" class). A perfect tracker that names and segments consistently scores 0.

A frame without a label map is listed in ``missing_predictions`` and scored as all unlabelled (``--missing miss``) or
is an error (``--missing error``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from autoseg.data.video_datasets import VideoClip, VideoDataset
from autoseg.evaluate import (
    MISSING_POLICIES,
    NameMapper,
    fmt,
    map_vocabularies,
    mapping_figures,
    percent,
    read_vocabulary,
    save_iou_chart,
    score_figures,
)
from autoseg.metrics import DatasetIoU, to_dataset_ids
from autoseg.outputs import prediction_files
from autoseg.outputs.files import palette, read_vocabulary_record
from autoseg.utils.io import atomic_write, atomic_write_json, atomic_write_text

STRIP_FRAMES = 6


def frame_stem(clip: str, t: int) -> str:
    """Output stem of frame ``t`` of clip ``clip``: ``clip/000000``."""
    return f"{clip}/{t:06d}"


def clip_vocabularies(pred_dir: Path, clip: VideoClip) -> dict[int, list[str] | None]:
    """The vocabulary of every annotated frame of ``clip`` (None: no prediction for that frame)."""
    record = prediction_files(pred_dir, clip.name)["record"]  # NAME.json (a clip named "manifest": manifest~.json)
    out: dict[int, list[str] | None] = {}
    if record.is_file():
        vocabulary = read_vocabulary_record(record)
        for t in clip.frames:
            out[t] = vocabulary if prediction_files(pred_dir, frame_stem(clip.name, t))["label_map"].is_file() else None
        return out
    return {t: read_vocabulary(pred_dir, frame_stem(clip.name, t)) for t in clip.frames}


def flicker_counts(gt0: np.ndarray, gt1: np.ndarray, pred0: np.ndarray, pred1: np.ndarray, ignore: int) -> tuple:
    """``(changed, stable)`` pixel counts between two consecutive frames: ``stable`` pixels keep their true class
    (not ``ignore``); ``changed`` ones among them change their predicted class."""
    stable = (gt0 == gt1) & (gt0 != ignore)
    return int((stable & (pred0 != pred1)).sum()), int(stable.sum())


def evaluate_video_predictions(
    pred_dir: str | Path,
    dataset: VideoDataset,
    mapper: NameMapper,
    absent_rule: str = "mmseg",
    missing: str = "miss",
    progress: bool = True,
    mapper_name: str | None = None,
) -> dict[str, Any]:
    """Score saved clip predictions on ``dataset`` (see the module docstring).

    Returns:
        the report dict: image-style figures in percent (``mIoU``, ``pixel_acc``, ``mean_acc``, ``fwIoU``,
        ``per_class``), ``flicker`` (percent), ``per_clip`` figures and the name mapping.

    Raises:
        FileNotFoundError / ValueError: missing folder, no prediction at all, malformed or wrong-size prediction.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: predictions folder not found (expected NAME/000000.png + NAME.json)")
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    vocabularies = {c.name: clip_vocabularies(pred_dir, c) for c in dataset.clips}
    missing_frames = [frame_stem(c, t) for c, v in vocabularies.items() for t, voc in v.items() if voc is None]
    if len(missing_frames) == dataset.n_frames:
        first = dataset.clips[0]
        raise ValueError(
            f"{pred_dir}: no prediction for any of the {dataset.n_frames} frames of {len(dataset.clips)} clips "
            f"(e.g. expected {pred_dir / frame_stem(first.name, first.frames[0])}.png and {first.name}.json)"
        )
    if missing_frames and missing == "error":
        raise ValueError(f"{pred_dir}: {len(missing_frames)} frames have no prediction (e.g. {missing_frames[:5]})")
    unique = sorted({w for v in vocabularies.values() for voc in v.values() if voc for w in voc})
    mapping = map_vocabularies(unique, mapper, dataset.classes, dataset.name)

    metric = DatasetIoU(dataset.num_classes, dataset.ignore_index, absent_rule)
    changed_total = stable_total = 0
    per_clip = {}
    bar = tqdm(total=dataset.n_frames, desc=f"scoring {dataset.name}", disable=not progress)
    for clip in dataset.clips:
        clip_metric = DatasetIoU(dataset.num_classes, dataset.ignore_index, absent_rule)
        changed = stable = 0
        previous: tuple[int, np.ndarray, np.ndarray] | None = None
        for k, t in enumerate(clip.frames):
            gt = dataset.read_mask(clip, k)
            ids = predicted_ids(pred_dir, dataset, clip.name, t, vocabularies[clip.name][t], mapping, gt.shape)
            metric.update(torch.from_numpy(ids), torch.from_numpy(gt))
            clip_metric.update(torch.from_numpy(ids), torch.from_numpy(gt))
            if previous is not None and previous[0] == t - 1:
                c, s = flicker_counts(previous[1], gt, previous[2], ids, dataset.ignore_index)
                changed, stable = changed + c, stable + s
            previous = (t, gt, ids)
            bar.update()
        changed_total, stable_total = changed_total + changed, stable_total + stable
        per_clip[clip.name] = {
            "frames": len(clip.frames),
            "mIoU": percent(float(clip_metric.compute()["mIoU"])),
            "flicker": percent(changed / stable if stable else float("nan")),
        }
    bar.close()

    return {
        "dataset": dataset.name,
        "root": str(dataset.root),
        "predictions": str(pred_dir),
        "mapper": mapper_name or type(mapper).__name__,
        "absent_rule": absent_rule,
        **score_figures(metric, dataset.classes),
        "flicker": percent(changed_total / stable_total if stable_total else float("nan")),
        "n_clips": len(dataset.clips),
        "n_frames": dataset.n_frames,
        "n_scored_pixels": int(metric.confmat.sum()),
        "n_stable_pixel_pairs": stable_total,
        "per_clip": per_clip,
        "missing_predictions": missing_frames,
        "missing_policy": missing,
        **mapping_figures(mapping, unique, dataset.classes, mapper),
    }


def predicted_ids(
    pred_dir: Path,
    dataset: VideoDataset,
    clip: str,
    t: int,
    vocabulary: list[str] | None,
    mapping: Mapping[str, int | None],
    shape: tuple[int, ...],
) -> np.ndarray:
    """Dataset class ids of the prediction of frame ``t`` of ``clip`` (all unlabelled when ``vocabulary`` is None)."""
    if vocabulary is None:
        label_map, vocabulary = np.zeros(shape, dtype=np.int64), []
    else:
        label_map = read_label_map(prediction_files(pred_dir, frame_stem(clip, t))["label_map"], len(vocabulary))
        if label_map.shape != shape:
            raise ValueError(
                f"{pred_dir / frame_stem(clip, t)}.png: prediction is {label_map.shape[1]}x{label_map.shape[0]} "
                f"(WxH) but the ground truth is {shape[1]}x{shape[0]}"
            )
    return to_dataset_ids(label_map, vocabulary, mapping, dataset.num_classes, dataset.background_index)


def read_label_map(png: Path, n_names: int) -> np.ndarray:
    """A single-channel label map (0 = unlabelled, 1..``n_names``) as ``H x W`` int64.

    Raises:
        FileNotFoundError / ValueError: the file is missing, not single-channel, or uses labels past ``n_names``.
    """
    if not png.is_file():
        raise FileNotFoundError(f"{png}: label map missing")
    with Image.open(png) as im:
        label_map = np.asarray(im).astype(np.int64)
    if label_map.ndim != 2:
        raise ValueError(f"{png}: expected a single-channel label map, got shape {label_map.shape}")
    if label_map.max(initial=0) > n_names:
        raise ValueError(f"{png}: label {label_map.max()} exceeds the vocabulary of {n_names} names")
    return label_map


def save_strip(report: Mapping[str, Any], dataset: VideoDataset, path: str | Path) -> Path:
    """A picture of up to ``STRIP_FRAMES`` frames of the first clip: frame, ground truth, prediction (rows)."""
    clip = dataset.clips[0]
    classes = list(dataset.classes)
    mapping = {w: (None if c is None else classes.index(c)) for w, c in report["mapping"].items()}
    vocabularies = clip_vocabularies(Path(report["predictions"]), clip)
    picks = sorted({round(i * (len(clip.frames) - 1) / max(STRIP_FRAMES - 1, 1)) for i in range(STRIP_FRAMES)})
    colours = palette(dataset.num_classes + 1)  # class c -> colours[c + 1]; void (C) and ignore -> black
    tiles = []
    for k in picks:
        t = clip.frames[k]
        gt = dataset.read_mask(clip, k)
        ids = predicted_ids(Path(report["predictions"]), dataset, clip.name, t, vocabularies[t], mapping, gt.shape)
        image_path = clip.frame_image(t)
        image = np.zeros((*gt.shape, 3), np.uint8)
        if image_path is not None:
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("RGB").resize((gt.shape[1], gt.shape[0])))

        def paint(x: np.ndarray) -> np.ndarray:
            return colours[np.where((x >= dataset.num_classes) | (x < 0), -1, x) + 1]

        tiles.append(np.concatenate([image, paint(gt), paint(ids)], axis=0).astype(np.uint8))
    strip = Image.fromarray(np.concatenate(tiles, axis=1))
    return atomic_write(path, lambda tmp: strip.save(tmp, format="PNG"))


def video_report_markdown(report: Mapping[str, Any], strip: str | None = None) -> str:
    """A markdown page: mIoU and flicker, per clip, a strip of frames, per class and the name mapping."""
    lines = [
        f"# {report['dataset']}: LAVE-mapped video evaluation",
        "",
        f"Predictions `{report['predictions']}`, mapper `{report['mapper']}`, absent-class rule "
        f"`{report['absent_rule']}`, {report['n_clips']} clips, {report['n_frames']} frames, "
        f"{len(report['missing_predictions'])} frames without a prediction.",
        "",
        "Flicker: among pixels whose true class is the same in frames t and t+1, the share whose predicted class "
        "changes (lower is steadier).",
        "",
        "| mIoU | flicker | pixel acc | mean acc | fwIoU |",
        "|---:|---:|---:|---:|---:|",
        f"| {fmt(report['mIoU'])} | {fmt(report['flicker'])} | {fmt(report['pixel_acc'])} | "
        f"{fmt(report['mean_acc'])} | {fmt(report['fwIoU'])} |",
        "",
        "## Per clip",
        "",
        "| clip | frames | mIoU | flicker |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {c['frames']} | {fmt(c['mIoU'])} | {fmt(c['flicker'])} |" for n, c in report["per_clip"].items()
    ]
    if strip:
        lines += ["", "## Frames of the first clip (rows: frame, ground truth, prediction)", "", f"![strip]({strip})"]
    lines += [
        "",
        "## Per class (%; `-` = skipped by the absent-class rule)",
        "",
        "| class | IoU | acc |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {fmt(v)} | {fmt(report['per_class_acc'][c])} |" for c, v in report["per_class"].items()]
    lines += ["", "## Name mapping", "", "| name | class |", "|---|---|"]
    lines += [f"| {w} | {c if c is not None else '(background / void)'} |" for w, c in report["mapping"].items()]
    return "\n".join(lines) + "\n"


def write_video_reports(report: Mapping[str, Any], dataset: VideoDataset, path: str | Path) -> dict[str, Path]:
    """Write ``path`` (JSON), ``path.md``, ``path_iou.png`` and ``path_strip.png`` atomically; returns the paths."""
    path = Path(path)
    md, png = path.with_suffix(".md"), path.with_name(path.stem + "_iou.png")
    strip = save_strip(report, dataset, path.with_name(path.stem + "_strip.png"))
    atomic_write_json(path, report)
    atomic_write_text(md, video_report_markdown(report, strip.name))
    save_iou_chart(report, png)
    return {"json": path, "markdown": md, "chart": png, "strip": strip}
