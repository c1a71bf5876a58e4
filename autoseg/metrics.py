"""Dataset-level semantic-segmentation metrics from one confusion matrix.

The metric accumulates a ``C x (C + 1)`` confusion matrix over the whole dataset (rows: ground-truth class, columns:
predicted class, plus a last "void / miss" column) and pure functions turn it into IoU figures, as mmseg's
``intersect_and_union`` / ``total_area_to_metrics`` do. Per-image IoUs are never averaged.

Void / miss (prediction id ``C``): a pixel whose predicted name mapped to no class, or that the segmenter left
unlabelled, where the dataset does not score background. It is a false negative of its true class and a false
positive of none. Where background is scored (VOC-21, Context-60) the caller maps such pixels to the background id
before :meth:`DatasetIoU.update` (see :func:`to_dataset_ids`).

Absent-class rules (classes with no ground-truth pixel in the whole dataset):

- ``"mmseg"`` (default; mmsegmentation's ``total_area_to_metrics``): IoU = intersection / union with 0 / 0 = NaN.
  A class neither in ground truth nor predicted is skipped (NaN); a class predicted but absent from ground truth
  has IoU 0 and pulls the mean down. Accuracy of a class without ground truth is NaN (skipped).
- ``"detectron2"`` (detectron2's ``SemSegEvaluator.evaluate``): IoU and accuracy are defined only for classes with
  ground-truth pixels (``pos_gt > 0``); every other class is NaN and skipped, even when predicted. Its false
  positives still lower the IoU of the true classes of those pixels. fwIoU weighs IoUs by ``pos_gt / sum(pos_gt)``.
  (detectron2 itself never sees void predictions, its argmax covers the classes only; here void pixels are misses
  under both rules.)

Both rules: mIoU = mean of the non-NaN IoUs; pixel accuracy = correct / scored pixels; mean accuracy = mean of the
non-NaN per-class accuracies (correct / ground-truth pixels of the class); fwIoU = sum over classes with a non-NaN IoU
of ``freq_c * IoU_c``, ``freq_c`` = ground-truth pixels of c / all scored pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torchmetrics import Metric

AbsentRule = Literal["mmseg", "detectron2"]
ABSENT_RULES: tuple[str, ...] = ("mmseg", "detectron2")


def confusion_matrix(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Confusion matrix of one batch, ignoring ``ignore_index`` pixels of ``target``.

    Args:
        pred: ``... x H x W`` predicted ids in ``0..num_classes`` (``num_classes`` = void / miss).
        target: same shape, ground-truth ids in ``0..num_classes - 1`` or ``ignore_index``.
        num_classes: number of dataset classes ``C``.
        ignore_index: ground-truth value of unscored pixels.

    Returns:
        ``C x (C + 1)`` int64 counts, ``[true class, predicted id]``.

    Raises:
        ValueError: shapes differ or a value is out of range (the message gives the offending values).
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("predictions and ground truth must be integer class ids, not floats")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        return torch.zeros(num_classes, num_classes + 1, dtype=torch.long, device=target.device)
    (t_lo, t_hi), (p_lo, p_hi) = target.aminmax(), pred.aminmax()  # one pass each; the masks only on error
    if t_lo < 0 or t_hi >= num_classes:
        bad = (target < 0) | (target >= num_classes)
        raise ValueError(
            f"ground-truth ids {torch.unique(target[bad])[:10].tolist()} outside 0..{num_classes - 1} "
            f"and not the ignore index {ignore_index}"
        )
    if p_lo < 0 or p_hi > num_classes:
        bad = (pred < 0) | (pred > num_classes)
        raise ValueError(
            f"predicted ids {torch.unique(pred[bad])[:10].tolist()} outside 0..{num_classes} ({num_classes} = void)"
        )
    counts = torch.bincount(target * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)


def intersect_and_union(confmat: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-class areas from a ``C x (C + 1)`` confusion matrix.

    Returns:
        ``intersect`` (true positives), ``area_pred`` (pixels predicted as the class), ``area_label`` (ground-truth
        pixels of the class, misses included) and ``union``, each a float64 array of length ``C``.
    """
    cm = np.asarray(torch.as_tensor(confmat).cpu(), dtype=np.float64)
    n = cm.shape[0]
    if cm.shape != (n, n + 1):
        raise ValueError(f"expected a C x (C + 1) confusion matrix, got shape {cm.shape}")
    intersect = np.diag(cm[:, :n]).copy()
    area_pred = cm[:, :n].sum(axis=0)  # the void column is nobody's prediction
    area_label = cm.sum(axis=1)
    return {
        "intersect": intersect,
        "area_pred": area_pred,
        "area_label": area_label,
        "union": area_pred + area_label - intersect,
    }


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    valid = ~np.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")


def metrics_from_confusion(confmat: torch.Tensor | np.ndarray, absent_rule: AbsentRule = "mmseg") -> dict:
    """Per-class IoU, mIoU, pixel accuracy, mean accuracy and frequency-weighted IoU (fractions in 0..1).

    Args:
        confmat: ``C x (C + 1)`` counts from :func:`confusion_matrix` (summed over a dataset).
        absent_rule: ``"mmseg"`` or ``"detectron2"`` (see the module docstring).

    Returns:
        ``{"iou": float64[C] (NaN = skipped), "acc": float64[C], "mIoU", "pixel_acc", "mean_acc", "fwIoU"}``;
        the scalar entries are NaN when nothing was scored.
    """
    if absent_rule not in ABSENT_RULES:
        raise ValueError(f"absent_rule must be one of {ABSENT_RULES}, got {absent_rule!r}")
    a = intersect_and_union(confmat)
    iou = _divide(a["intersect"], a["union"])
    acc = _divide(a["intersect"], a["area_label"])
    if absent_rule == "detectron2":
        iou[a["area_label"] == 0] = np.nan
    total = a["area_label"].sum()
    freq = a["area_label"] / total if total > 0 else np.zeros_like(a["area_label"])
    valid = ~np.isnan(iou)
    return {
        "iou": iou,
        "acc": acc,
        "mIoU": _nanmean(iou),
        "pixel_acc": float(a["intersect"].sum() / total) if total > 0 else float("nan"),
        "mean_acc": _nanmean(acc),
        "fwIoU": float((freq[valid] * iou[valid]).sum()) if total > 0 else float("nan"),
    }


class DatasetIoU(Metric):
    """Confusion-matrix segmentation metric over a whole dataset; sums across processes under DDP.

    Args:
        num_classes: number of dataset classes ``C``; predictions may also hold ``C`` (void / miss).
        ignore_index: ground-truth value of unscored pixels (255; 65535 for Context-459 / ADE-847).
        absent_rule: ``"mmseg"`` (default) or ``"detectron2"``; see the module docstring.

    ``compute()`` returns :func:`metrics_from_confusion`'s dict with tensors: ``iou``/``acc`` of shape ``C`` and
    scalar ``mIoU``, ``pixel_acc``, ``mean_acc``, ``fwIoU`` (fractions, float64).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255, absent_rule: AbsentRule = "mmseg", **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if absent_rule not in ABSENT_RULES:
            raise ValueError(f"absent_rule must be one of {ABSENT_RULES}, got {absent_rule!r}")
        if 0 <= ignore_index <= num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with class / void ids 0..{num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.absent_rule = absent_rule
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes + 1, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` and ``target`` are ``B x H x W`` (or ``H x W``) integer ids."""
        self.confmat += confusion_matrix(preds, target, self.num_classes, self.ignore_index).to(self.confmat.device)

    def compute(self) -> dict[str, torch.Tensor]:
        out = metrics_from_confusion(self.confmat, self.absent_rule)
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in out.items()}


def to_dataset_ids(
    label_map: np.ndarray,
    vocabulary: Sequence[str],
    mapping: Mapping[str, int | None],
    num_classes: int,
    background_index: int | None,
) -> np.ndarray:
    """Turn one image's open-vocabulary label map into dataset class ids.

    Args:
        label_map: ``H x W`` ints; 0 = unlabelled, ``i`` = ``vocabulary[i - 1]``.
        vocabulary: the image's names.
        mapping: name -> class id, or None for background / void (every vocabulary name must be a key).
        num_classes: number of dataset classes ``C`` (``C`` is the void / miss id).
        background_index: class id of background where the dataset scores it (VOC-21); unlabelled pixels and names
            mapped to None then become background. None: they become void (``C``), i.e. misses.

    Returns:
        ``H x W`` int64 ids in ``0..C``.

    Raises:
        ValueError: a name is missing from ``mapping``, a class id is out of range, or a label exceeds the vocabulary.
    """
    void = num_classes if background_index is None else background_index
    lut = np.empty(len(vocabulary) + 1, dtype=np.int64)
    lut[0] = void
    for i, name in enumerate(vocabulary, start=1):
        if name not in mapping:
            raise ValueError(f"vocabulary name {name!r} has no entry in the name -> class mapping")
        cls = mapping[name]
        if cls is not None and not 0 <= cls < num_classes:
            raise ValueError(f"name {name!r} maps to class id {cls}, outside 0..{num_classes - 1}")
        lut[i] = void if cls is None else cls
    label_map = np.asarray(label_map)
    if label_map.size and (label_map.min() < 0 or label_map.max() > len(vocabulary)):
        raise ValueError(f"label map holds labels {label_map.min()}..{label_map.max()} beyond 0..{len(vocabulary)}")
    return lut[label_map.astype(np.int64)]
