"""Mask-supervised grouping of patch tokens: patch labels, the supervised contrastive loss, cluster matching.

These are the pieces of the enhancer's training objective and of its validation figure (cluster mIoU), kept as
pure functions so they can be tested against naive references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

IGNORED = -1  # patch label of patches that are mostly unscored
_DENSE_IDS = 4096  # patch_labels counts ids below this directly, larger ones through torch.unique


def patch_labels(mask: torch.Tensor, grid: tuple[int, int], ignore_index: int, max_ignore: float = 0.5) -> torch.Tensor:
    """Majority ground-truth class of each patch.

    Args:
        mask: ``B x H x W`` class ids (``ignore_index`` = unscored); ``H`` and ``W`` multiples of the grid.
        grid: ``(h, w)`` patch grid.
        ignore_index: mask value of unscored pixels.
        max_ignore: a patch with more than this fraction of unscored pixels is ignored.

    Returns:
        ``B x (h * w)`` long labels, row-major; ``IGNORED`` (-1) for ignored patches. Ties go to the smaller id.
    """
    b, hh, ww = mask.shape
    h, w = grid
    if hh % h or ww % w:
        raise ValueError(f"mask {hh}x{ww} is not a whole number of {h}x{w} patches")
    ph, pw = hh // h, ww // w
    cells = mask.reshape(b, h, ph, w, pw).permute(0, 1, 3, 2, 4).reshape(b, h * w, ph * pw)  # B x N x P
    unscored = cells == ignore_index
    ids = torch.where(unscored, 0, cells).long()
    if ids.numel() and int(ids.min()) >= 0 and int(ids.max()) < _DENSE_IDS:
        # count the class ids directly: torch.unique sorts every pixel, a tenth of a ShapesWorld training step
        counts = torch.zeros(b, h * w, int(ids.max()) + 1, device=mask.device)
        counts.scatter_add_(2, ids, (~unscored).to(counts.dtype))  # unscored pixels add nothing
        labels = counts.argmax(-1)  # first maximum = smallest id
    else:
        classes, inverse = torch.unique(torch.where(unscored, -1, cells), return_inverse=True)  # -1 sorts first
        counts = torch.zeros(b, h * w, classes.numel(), device=mask.device)
        counts.scatter_add_(2, inverse, torch.ones_like(inverse, dtype=counts.dtype))  # B x N x K
        if classes[0] == -1:
            counts[..., 0] = -1  # the unscored pseudo-class never wins
        labels = classes[counts.argmax(-1)]  # first maximum = smallest id
    labels[(unscored.float().mean(-1) > max_ignore) | unscored.all(-1)] = IGNORED
    return labels


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over a set of tokens.

    Each token is pulled towards every other token of its class and pushed from the rest, in cosine similarity.

    Args:
        features: ``M x D`` tokens (normalised inside).
        labels: ``M`` class ids.
        temperature: softmax temperature.

    Returns:
        scalar mean over anchors with at least one positive (0 when there are none).
    """
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.T / temperature  # M x M
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, -torch.inf)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positive.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return features.sum() * 0.0
    mean_log_prob = torch.where(positive, log_prob, 0.0).sum(1)[anchors] / n_pos[anchors]
    return -mean_log_prob.mean()


def match_clusters(clusters: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Name clusters by the ground-truth classes they overlap best (one-to-one Hungarian matching on IoU).

    Args:
        clusters: ``H x W`` cluster ids ``0..k-1``.
        target: ``H x W`` class ids or ``ignore_index``.
        num_classes: ``C``; unmatched clusters become ``C`` (void: a miss of the true class).
        ignore_index: unscored ground-truth value (those pixels do not count in the IoU).

    Returns:
        ``H x W`` long predicted class ids in ``0..C``.
    """
    clusters = clusters.long()
    scored = target != ignore_index
    present = torch.unique(target[scored])
    k = int(clusters.max()) + 1
    lut = torch.full((k,), num_classes, dtype=torch.long, device=clusters.device)
    if present.numel():
        col = torch.searchsorted(present, target[scored])  # class -> column
        inter = torch.zeros(k, present.numel(), dtype=torch.float64, device=clusters.device)
        inter.index_put_((clusters[scored], col), torch.ones_like(col, dtype=torch.float64), accumulate=True)
        union = inter.sum(1, keepdim=True) + inter.sum(0, keepdim=True) - inter
        iou = (inter / union.clamp_min(1)).cpu().numpy()
        rows, cols = linear_sum_assignment(-iou)
        lut[torch.as_tensor(rows, device=lut.device)] = present[torch.as_tensor(cols, device=present.device)]
    return lut[clusters]
