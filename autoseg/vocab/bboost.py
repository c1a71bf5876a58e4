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


# BLAS kernels for products with 1-3 rows or columns differ in the last bit from those for bigger ones (measured
# with MKL). Which runs share a product depends on the batch, so tiny products are padded to the usual kernels.
MIN_GEMM = 4


def at_least(m: torch.Tensor, rows: int = MIN_GEMM) -> torch.Tensor:
    """``B x C x K`` padded with zero rows to at least ``rows`` rows (dimension 1)."""
    return F.pad(m, (0, 0, 0, rows - m.shape[1])) if m.shape[1] < rows else m


def kmeans_draws(
    n: int, k: int, n_init: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of one seeded k-means run, drawn in a fixed order so that batching cannot change them.

    Returns:
        ``R`` first-centre indices (long) and ``R x (k - 1)`` uniforms for the k-means++ picks (``R = n_init``).
    """
    first = torch.randint(n, (n_init,), generator=generator, device=device)
    return first, torch.rand(n_init, k - 1, generator=generator, device=device)


def batched_kmeans(
    x: torch.Tensor, ks: Sequence[int], first: torch.Tensor, uniforms: torch.Tensor, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means for several images and several k at once: every image is clustered for every ``k`` in ``ks``.

    k-means++ seeding picks each next centre by inverse-CDF sampling with the given uniforms (so the picks do not
    depend on what else is in the batch); each run (image, k, restart) stops on its own when its labels no longer
    change, exactly as if it ran alone, and runs that stopped in every image drop out of the computation. Centres
    of a problem with ``k < max(ks)`` are padded; the padding never wins an assignment.

    Args:
        x: ``B x N x D`` points of ``B`` images.
        ks: ``Q`` numbers of clusters (each ``1 <= k <= N``).
        first: ``Q x R`` first-centre indices of the ``R`` restarts (see :func:`kmeans_draws`).
        uniforms: ``Q x R x (max(ks) - 1)`` uniforms in [0, 1) of the k-means++ picks (columns ``>= k - 1`` unused).

    Returns:
        labels ``B x Q x N`` and centres ``B x Q x max(ks) x D`` of the lowest-inertia restart, and the inertia of
        every restart ``B x Q x R``.
    """
    b, n, _ = x.shape
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={list(ks)}, N={n}")
    x = x.float()
    q, r = first.shape
    kmax, device = max(ks), x.device
    k_run = torch.as_tensor(list(ks), device=device).repeat_interleave(r)  # P = Q * R runs per image
    valid = torch.arange(kmax, device=device) < k_run[:, None]  # P x kmax: real centres of each run
    sq = (x * x).sum(-1)  # B x N
    rows = torch.arange(b, device=device)[:, None]

    def dist2(c: torch.Tensor) -> torch.Tensor:  # B x C x D centres -> B x C x N squared distances
        cross = torch.einsum("bnd,bcd->bcn", x, at_least(c))[:, : c.shape[1]]
        return (sq[:, None, :] - 2 * cross + (c * c).sum(-1)[..., None]).clamp_min(0)

    def distances(centres: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
        """B x P' x kmax x D centres of ``runs`` -> B x P' x N x kmax distances (inf for padding centres)."""
        i, j = valid[runs].nonzero(as_tuple=True)  # only real centres are computed
        full = torch.full((b, len(runs), n, kmax), float("inf"), device=device)
        full.transpose(-1, -2)[:, i, j] = dist2(centres[:, i, j])
        return full

    # k-means++ seeding, every image, k and restart at once
    centres = x[rows, first.flatten()[None]][:, :, None, :]  # B x P x 1 x D
    closest = dist2(centres[:, :, 0])  # B x P x N
    draws = uniforms.reshape(q * r, -1)  # P x (kmax - 1)
    for j in range(1, kmax):
        weights = closest + 1e-12 * (closest.sum(-1, keepdim=True) == 0)  # all-duplicate points: uniform
        cdf = weights.cumsum(-1)
        target = draws[None, :, j - 1] * cdf[..., -1]  # B x P
        idx = torch.searchsorted(cdf, target[..., None], right=True)[..., 0].clamp_max(n - 1)
        new = x[rows, idx]  # B x P x D
        centres = torch.cat([centres, new[:, :, None, :]], dim=-2)
        grow = (k_run > j)[None, :, None]  # runs with fewer clusters ignore this centre
        closest = torch.where(grow, torch.minimum(closest, dist2(new)), closest)

    every = torch.arange(q * r, device=device)
    labels = distances(centres, every).argmin(-1)  # B x P x N
    done = torch.zeros(labels.shape[:-1], dtype=torch.bool, device=device)  # B x P
    for _ in range(max_iter):
        act = (~done).any(0).nonzero()[:, 0]  # runs still moving in some image
        if act.numel() == 0:
            break
        lab, cen, fin = labels[:, act], centres[:, act], done[:, act]
        i, j = valid[act].nonzero(as_tuple=True)  # real centres of the active runs
        member = (lab[:, i, :] == j[None, :, None]).float()  # B x C x N
        counts = member.sum(-1)  # B x C
        mean = torch.bmm(at_least(member), x)[:, : member.shape[1]] / counts.clamp_min(1)[..., None]  # B x C x D
        # an empty cluster keeps its previous centre; a converged run keeps its centres
        moved = torch.where((counts[..., None] > 0) & ~fin[:, i, None], mean, cen[:, i, j])
        cen[:, i, j] = moved
        new_labels = distances(cen, act).argmin(-1)
        changed = (new_labels != lab).any(-1) & ~fin
        centres[:, act] = cen
        labels[:, act] = torch.where(changed[..., None], new_labels, lab)
        done[:, act] = ~changed
    dist = distances(centres, every)  # B x P x N x kmax
    inertia = dist.gather(-1, labels[..., None])[..., 0].sum(-1).reshape(b, q, r)  # B x Q x R
    best = inertia.argmin(-1) + torch.arange(q, device=device) * r  # B x Q, as run indices
    return labels[rows, best], centres[rows, best], inertia


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
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k}, N={n}")
    first, uniforms = kmeans_draws(n, k, n_init, generator, x.device)
    labels, centres, _ = batched_kmeans(x[None], [k], first[None], uniforms[None], max_iter)
    return labels[0, 0], centres[0, 0]


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
            tokens: ``... x (h * w) x D`` patch tokens on grid ``(h, w)`` (one image, or a batch ``B x N x D``).

        Returns:
            ``... x (h * w) x (D + pos_dim)``.
        """
        cfg = self.config
        feats = F.normalize(tokens.float(), dim=-1) if cfg.normalize_tokens else tokens.float()
        if cfg.pos_dim:
            pos = sine_position_code(*grid, cfg.pos_dim).to(feats.device)
            feats = torch.cat([feats, cfg.pos_weight * pos.expand(*feats.shape[:-1], -1)], dim=-1)
        return feats

    def batch_label_maps(
        self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0
    ) -> list[list[torch.Tensor]]:
        """k-means label maps of a batch for every scale and every k, each resized to the finest grid.

        All images and all k of a scale are clustered together (:func:`batched_kmeans`); the run for (scale, k)
        draws from its own generator seeded by ``(seed, scale, k)``, so an image gets the same maps in any batch.

        Args:
            tokens: per scale, ``B x (h * w) x D`` patch tokens.
            grids: per scale, ``(h, w)``.

        Returns:
            per image, ``len(tokens) * number of k`` label maps ``H x W`` on the finest grid.
        """
        cfg = self.config
        target = max(grids, key=lambda g: g[0] * g[1])
        maps: list[list[torch.Tensor]] = [[] for _ in range(tokens[0].shape[0])]
        for scale_idx, (tok, grid) in enumerate(zip(tokens, grids, strict=True)):
            feats = self.features(tok, grid)  # B x N x D'
            n, device = feats.shape[1], feats.device
            k_range = range(cfg.k_min, cfg.k_max + 1)
            ks = [min(k, n) for k in k_range]
            gens = [torch.Generator(device=device).manual_seed(seed * 1000 + scale_idx * 100 + k) for k in k_range]
            draws = [kmeans_draws(n, kk, cfg.n_init, g, device) for kk, g in zip(ks, gens, strict=True)]
            first = torch.stack([f for f, _ in draws])  # Q x R
            uniforms = torch.zeros(len(ks), cfg.n_init, max(max(ks) - 1, 0), device=device)  # Q x R x (kmax - 1)
            for q, (_, u) in enumerate(draws):
                uniforms[q, :, : u.shape[1]] = u
            labels, _, _ = batched_kmeans(feats, ks, first, uniforms, cfg.max_iter)  # B x Q x N
            for b, per_image in enumerate(maps):
                per_image += [resize_labels(lab.reshape(grid), target) for lab in labels[b]]
        return maps

    def label_maps(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0):
        """k-means label maps of one image (``(h * w) x D`` tokens per scale); see :meth:`batch_label_maps`."""
        return self.batch_label_maps([t[None] for t in tokens], grids, seed)[0]

    def batch(
        self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0
    ) -> list[torch.Tensor]:
        """Cluster a batch of images: batched k-means, then alignment, CRF and majority filter per image.

        Args:
            tokens: per scale, ``B x (h * w) x D`` patch tokens.
            grids: per scale, ``(h, w)``.

        Returns:
            per image, an ``H x W`` cluster map on the finest grid with labels ``0..n-1`` (consecutive).
        """
        cfg = self.config
        out = []
        for maps in self.batch_label_maps(tokens, grids, seed):
            probs = soft_labels(maps)
            if cfg.crf_iters > 0:
                probs = dense_crf(probs, cfg.crf_weight, cfg.crf_theta, cfg.crf_iters)
            labels = majority_filter(probs.argmax(0), cfg.majority_max_passes)
            out.append(relabel_consecutive(labels))
        return out

    def __call__(self, tokens: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]], seed: int = 0) -> torch.Tensor:
        """Cluster one image (``(h * w) x D`` tokens per scale); returns its ``H x W`` map (see :meth:`batch`)."""
        return self.batch([t[None] for t in tokens], grids, seed)[0]
