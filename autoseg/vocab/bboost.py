"""BBoost: turn multi-scale patch tokens into a clean cluster map (the grouping half of AutoSeg's vocabulary step).

Following the paper: at each scale, patch tokens (with a 2-D sine position code appended) are clustered by k-means
for every k in a range. The label map with the most distinct labels is the reference; every other map is aligned to
it by Hungarian matching on label overlap. The frequency of each aligned label over all maps is a soft label per
patch, which a dense CRF (mean field) smooths; a 3x3 majority filter, repeated until stable, removes speckle.

All functions here are pure and batched in torch; nothing depends on the captioning model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


@dataclass
class BBoostConfig:
    """Hyperparameters of the grouping step (defaults follow the released AutoSeg code, see REFERENCE.md)."""

    k_min: int = 2
    k_max: int = 8
    n_init: int = 8  # k-means restarts; the lowest-inertia run is kept
    max_iter: int = 100
    pos_dim: int = 256  # channels of the 2-D sine position code appended to each token (0 disables it)
    pos_weight: float = 1.0  # scale of the position code relative to the L2-normalised token
    normalize_tokens: bool = True
    crf_weight: float = 6.0  # Potts smoothness weight
    crf_theta: float = 0.8  # Gaussian kernel width, in patches
    crf_iters: int = 5
    majority_max_passes: int = 8


def sine_position_code(height: int, width: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR-style 2-D sinusoidal position code on a ``height x width`` grid.

    Returns:
        ``(height * width) x dim`` tensor; half the channels encode y, half x.
    """
    if dim % 4:
        raise ValueError(f"pos_dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # quarter
    ys, xs = torch.meshgrid(
        torch.linspace(0, 1, height) * 2 * math.pi, torch.linspace(0, 1, width) * 2 * math.pi, indexing="ij"
    )
    y = ys.reshape(-1, 1) * omega  # HW x quarter
    x = xs.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1) / math.sqrt(2 * quarter)  # unit norm per row


def kmeans(
    x: torch.Tensor, k: int, n_init: int = 8, max_iter: int = 100, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ seeding; the ``n_init`` restarts run batched and the lowest inertia wins.

    Args:
        x: ``N x D`` points.
        k: number of clusters (``k <= N``).

    Returns:
        labels ``N`` (long) and centres ``k x D``.
    """
    n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k}, N={n}")
    x = x.float()
    sq = (x * x).sum(1)  # N

    def dist2(c: torch.Tensor) -> torch.Tensor:  # R x k x D -> R x N x k squared distances
        return (sq[None, :, None] - 2 * torch.einsum("nd,rkd->rnk", x, c) + (c * c).sum(-1)[:, None, :]).clamp_min(0)

    # k-means++ seeding, all restarts at once
    first = torch.randint(n, (n_init,), generator=generator, device=x.device)
    centres = x[first][:, None, :]  # R x 1 x D
    closest = dist2(centres)[..., 0]  # R x N
    for _ in range(1, k):
        weights = closest + 1e-12 * (closest.sum(1, keepdim=True) == 0)  # all-duplicate points: uniform
        idx = torch.multinomial(weights, 1, generator=generator)[:, 0]  # R
        centres = torch.cat([centres, x[idx][:, None, :]], dim=1)
        closest = torch.minimum(closest, dist2(centres[:, -1:, :])[..., 0])

    labels = dist2(centres).argmin(-1)  # R x N
    for _ in range(max_iter):
        onehot = F.one_hot(labels, k).float()  # R x N x k
        counts = onehot.sum(1)  # R x k
        sums = torch.einsum("rnk,nd->rkd", onehot, x)
        # an empty cluster keeps its previous centre
        centres = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centres)
        new_labels = dist2(centres).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    inertia = dist2(centres).gather(-1, labels[..., None])[..., 0].sum(1)  # R
    best = int(inertia.argmin())
    return labels[best], centres[best]


def relabel_consecutive(labels: torch.Tensor) -> torch.Tensor:
    """Map the labels present in ``labels`` to ``0..n-1`` in order of first appearance (row-major)."""
    flat = labels.flatten()
    uniq, first = np.unique(flat.cpu().numpy(), return_index=True)
    order = uniq[np.argsort(first)]
    lut = torch.full((int(flat.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    lut[torch.as_tensor(order, device=labels.device)] = torch.arange(len(order), device=labels.device)
    return lut[labels]


def hungarian_align(labels: torch.Tensor, reference: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    """Rename the labels of ``labels`` to the reference labels they overlap most (one-to-one, by IoU).

    Args:
        labels: ``H x W`` map with labels ``0..k-1``.
        reference: ``H x W`` map with labels ``0..K-1``.

    Returns:
        ``H x W`` map in the reference's label space. A label left unmatched (only when ``k > K``) gets a fresh
        id ``>= K``.
    """
    k = int(labels.max()) + 1
    n_ref = n_ref if n_ref is not None else int(reference.max()) + 1
    inter = torch.zeros(k, n_ref, dtype=torch.float64)
    inter.index_put_(
        (labels.flatten().cpu(), reference.flatten().cpu()),
        torch.ones(labels.numel(), dtype=torch.float64),
        accumulate=True,
    )
    area_a = inter.sum(1, keepdim=True)
    area_b = inter.sum(0, keepdim=True)
    iou = inter / (area_a + area_b - inter).clamp_min(1)
    rows, cols = linear_sum_assignment(-iou.numpy())
    lut = torch.arange(k, dtype=torch.long) + n_ref  # unmatched -> fresh ids
    lut[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return lut.to(labels.device)[labels]


def soft_labels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Align every map to the one with the most distinct labels and count label frequencies.

    Args:
        maps: label maps, each ``H x W`` on the same grid.

    Returns:
        ``K x H x W`` soft labels (frequencies summing to 1 per pixel), K = number of labels of the reference.
    """
    n_labels = [int(torch.unique(m).numel()) for m in maps]
    ref = relabel_consecutive(maps[int(np.argmax(n_labels))])
    n_ref = int(ref.max()) + 1
    votes = torch.zeros(n_ref, *ref.shape, dtype=torch.float32, device=ref.device)
    for m in maps:
        aligned = hungarian_align(relabel_consecutive(m), ref, n_ref)
        # labels with no reference partner (cannot happen when the reference has the most labels) are dropped
        valid = aligned < n_ref
        votes += F.one_hot(aligned.clamp_max(n_ref - 1), n_ref).permute(2, 0, 1).float() * valid
    return votes / votes.sum(0, keepdim=True).clamp_min(1e-12)


def dense_crf(probs: torch.Tensor, weight: float = 6.0, theta: float = 0.8, iters: int = 5) -> torch.Tensor:
    """Mean-field inference of a fully connected CRF with a Gaussian (smoothness) kernel and Potts compatibility.

    The grids here are small (at most a few thousand patches), so the pairwise kernel is a dense matrix; this
    avoids pydensecrf, which does not build on current Python/NumPy.

    Args:
        probs: ``K x H x W`` label probabilities (the unary is ``-log probs``); the class axis is first.

    Returns:
        ``K x H x W`` refined marginals.
    """
    k, h, w = probs.shape
    unary = -torch.log(probs.clamp_min(1e-6)).reshape(k, h * w)  # K x N
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).to(probs.device)  # N x 2
    kernel = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * theta**2))  # N x N
    kernel.fill_diagonal_(0)
    q = torch.softmax(-unary, dim=0)
    for _ in range(iters):
        message = q @ kernel  # K x N: support for each label from similar neighbours
        # Potts: energy of label l is unary + weight * sum_j k_ij (1 - q_j(l)); the constant part cancels in softmax
        q = torch.softmax(-unary + weight * message, dim=0)
    return q.reshape(k, h, w)


def majority_filter(labels: torch.Tensor, max_passes: int = 8) -> torch.Tensor:
    """Replace each label by the most frequent one in its 3x3 neighbourhood, until stable or ``max_passes``.

    Ties keep the current label, so a stable map is a fixed point.
    """
    k = int(labels.max()) + 1
    for _ in range(max_passes):
        onehot = F.one_hot(labels, k).permute(2, 0, 1).float()[None]  # 1 x K x H x W
        counts = F.conv2d(onehot, torch.ones(k, 1, 3, 3, device=labels.device), padding=1, groups=k)[0]
        new = (counts + 0.5 * onehot[0]).argmax(0)  # the current label wins ties
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an ``H x W`` label map: nearest when upsampling, area-majority when downsampling."""
    if tuple(labels.shape) == tuple(size):
        return labels
    k = int(labels.max()) + 1
    onehot = F.one_hot(labels, k).permute(2, 0, 1).float()[None]
    if size[0] * size[1] >= labels.numel():
        return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return F.adaptive_avg_pool2d(onehot, size)[0].argmax(0)


class BBoost:
    """Multi-scale k-means + alignment + CRF + majority filter, as in the paper's BBoost.

    Args:
        config: hyperparameters.
    """

    def __init__(self, config: BBoostConfig | None = None):
        self.config = config or BBoostConfig()
        if not 1 <= self.config.k_min <= self.config.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.config.k_min}..{self.config.k_max}")

    def features(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Clustering features: (normalised) tokens with the position code appended.

        Args:
            tokens: ``(h * w) x D`` patch tokens of one image on grid ``(h, w)``.

        Returns:
            ``(h * w) x (D + pos_dim)``.
        """
        cfg = self.config
        feats = F.normalize(tokens.float(), dim=-1) if cfg.normalize_tokens else tokens.float()
        if cfg.pos_dim:
            pos = sine_position_code(*grid, cfg.pos_dim).to(feats.device)
            feats = torch.cat([feats, cfg.pos_weight * pos], dim=-1)
        return feats

    def label_maps(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0):
        """k-means label maps for every scale and every k, each resized to the finest grid.

        Args:
            tokens: per scale, ``(h * w) x D`` patch tokens of one image.
            grids: per scale, ``(h, w)``.

        Returns:
            list of ``H x W`` label maps on the finest grid (``len(tokens) * number of k`` maps).
        """
        cfg = self.config
        target = max(grids, key=lambda g: g[0] * g[1])
        maps = []
        for scale_idx, (tok, grid) in enumerate(zip(tokens, grids, strict=True)):
            feats = self.features(tok, grid)
            for k in range(cfg.k_min, cfg.k_max + 1):
                gen = torch.Generator(device=feats.device).manual_seed(seed * 1000 + scale_idx * 100 + k)
                labels, _ = kmeans(feats, min(k, feats.shape[0]), cfg.n_init, cfg.max_iter, gen)
                maps.append(resize_labels(labels.reshape(grid), target))
        return maps

    def __call__(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0) -> torch.Tensor:
        """Cluster one image.

        Args:
            tokens: per scale, ``(h * w) x D`` patch tokens.
            grids: per scale, ``(h, w)``.

        Returns:
            ``H x W`` cluster map on the finest grid with labels ``0..n-1`` (consecutive).
        """
        cfg = self.config
        probs = soft_labels(self.label_maps(tokens, grids, seed))
        if cfg.crf_iters > 0:
            probs = dense_crf(probs, cfg.crf_weight, cfg.crf_theta, cfg.crf_iters)
        labels = majority_filter(probs.argmax(0), cfg.majority_max_passes)
        return relabel_consecutive(labels)
