"""Padding variable-length sets of encoder states for one decoder pass, and grouping them so padding stays small."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``L_r x D`` tensors padded with zeros into ``R x L x D`` (L the longest), and the ``R x L`` mask of real rows.

    One gather from the concatenated rows (index ``n`` is an appended zero row): its backward is one scatter, where
    ``pad_sequence``'s backward copies the whole ``R x L x D`` gradient once per row (most of a training step of the
    region captioner).
    """
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    flat = torch.cat([*rows, rows[0].new_zeros(1, rows[0].shape[1])])
    mask = torch.arange(int(lengths.max()), device=flat.device)[None] < lengths[:, None]
    index = torch.full(mask.shape, flat.shape[0] - 1, dtype=torch.long, device=flat.device)
    index[mask] = torch.arange(flat.shape[0] - 1, device=flat.device)
    return flat[index], mask


def length_groups(lengths: Sequence[int], max_groups: int = 4, pass_cost: int = 256) -> list[list[int]]:
    """Indices of ``lengths`` split into at most ``max_groups`` groups of similar length, each padded on its own.

    The split of the sorted lengths minimises the padded size, ``sum(len(group) * max(group))``, plus ``pass_cost``
    padded tokens for each group after the first (the fixed cost of one more decoder pass): exact dynamic
    programming over the cut points.

    Returns:
        the groups, shortest first, each in increasing length (ties by index).
    """
    order = np.argsort(np.asarray(lengths), kind="stable")
    sizes = np.asarray(lengths, dtype=np.float64)[order]
    n = len(sizes)
    if n == 0:
        return []
    starts = np.arange(n)
    # best[g, j]: least cost of the first j sorted sets in g + 1 groups; cut[g, j]: where its last group starts
    best = np.full((max_groups, n + 1), np.inf)
    cut = np.zeros((max_groups, n + 1), dtype=np.int64)
    best[0, 1:] = np.arange(1, n + 1) * sizes
    for g in range(1, max_groups):
        for j in range(g + 1, n + 1):
            cost = best[g - 1, :j] + (j - starts[:j]) * sizes[j - 1] + pass_cost
            cut[g, j] = int(np.argmin(cost))
            best[g, j] = cost[cut[g, j]]
    g = int(np.argmin(best[:, n]))  # the first of equal costs: fewer passes
    groups, j = [], n
    while g >= 0:
        i = cut[g, j]
        groups.append(order[i:j].tolist())
        j, g = i, g - 1
    return groups[::-1]
