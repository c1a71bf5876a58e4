"""Patch labels, supervised contrastive loss and cluster matching against naive references and hand examples."""

import itertools
import math

import numpy as np
import pytest
import torch

from autoseg.lit.grouping import IGNORED, match_clusters, patch_labels, supervised_contrastive


def naive_patch_labels(mask, grid, ignore, max_ignore):
    b, hh, ww = mask.shape
    ph, pw = hh // grid[0], ww // grid[1]
    out = np.full((b, grid[0] * grid[1]), IGNORED)
    for n, i, j in itertools.product(range(b), range(grid[0]), range(grid[1])):
        cell = mask[n, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].ravel()
        if np.mean(cell == ignore) > max_ignore:
            continue
        values, counts = np.unique(cell[cell != ignore], return_counts=True)
        out[n, i * grid[1] + j] = values[np.argmax(counts)]  # np.unique sorts: ties -> smallest id
    return out


def test_patch_labels_hand_example():
    mask = torch.tensor(
        [
            [0, 0, 1, 255],
            [0, 1, 255, 255],
            [7, 7, 3, 3],
            [7, 255, 2, 2],
        ]
    )[None]
    # patches (2x2): [0,0,0,1] -> 0; [1,255,255,255] -> ignored (3/4 unscored); [7,7,7,255] -> 7; [3,3,2,2] -> tie -> 2
    assert patch_labels(mask, (2, 2), 255).tolist() == [[0, IGNORED, 7, 2]]
    # at exactly half unscored a patch keeps its label: [1, 255] of a 1x2 patch
    assert patch_labels(torch.tensor([[[1, 255]]]), (1, 1), 255, max_ignore=0.5).tolist() == [[1]]


@pytest.mark.parametrize(("ignore", "top"), [(255, 300), (65535, 300), (255, 6), (-100, 6), (255, 70000)])
def test_patch_labels_match_a_naive_loop(ignore, top):
    # few classes (ties in most patches), a negative ignore index, and ids past the directly counted range
    rng = np.random.default_rng(0)
    mask = rng.integers(0, top, (3, 12, 16))
    mask[rng.random(mask.shape) < 0.3] = ignore
    mask[:, :4, :4] = 5  # some clean patches
    got = patch_labels(torch.as_tensor(mask), (3, 4), ignore, max_ignore=0.4).numpy()
    np.testing.assert_array_equal(got, naive_patch_labels(mask, (3, 4), ignore, 0.4))


def test_patch_labels_reject_a_mask_that_is_not_whole_patches():
    with pytest.raises(ValueError, match="not a whole number of 3x3 patches"):
        patch_labels(torch.zeros(1, 10, 9, dtype=torch.long), (3, 3), 255)


def naive_supcon(z, labels, t):
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    terms = []
    for i in range(len(z)):
        pos = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(z[i] @ z[a] / t) for a in range(len(z)) if a != i)
        terms.append(-np.mean([math.log(math.exp(z[i] @ z[p] / t) / denom) for p in pos]))
    return float(np.mean(terms))


def test_supervised_contrastive_matches_the_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(9, 5))
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])  # classes 2 and 4 have no positive: not anchors
    got = supervised_contrastive(torch.as_tensor(z), torch.as_tensor(labels), temperature=0.5)
    assert got.item() == pytest.approx(naive_supcon(z, labels, 0.5), rel=1e-5)


def test_supervised_contrastive_is_low_for_grouped_tokens_and_zero_without_pairs():
    grouped = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]])
    mixed = torch.tensor([[1.0, 0], [0, 1], [1, 0.01], [0.01, 1]])
    labels = torch.tensor([0, 0, 1, 1])
    assert supervised_contrastive(grouped, labels, 0.1) < 0.01 < 5 < supervised_contrastive(mixed, labels, 0.1)
    assert supervised_contrastive(torch.randn(3, 4), torch.tensor([0, 1, 2])).item() == 0.0


def test_match_clusters_hand_example():
    clusters = torch.tensor(
        [
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [2, 2, 2, 3],
        ]
    )
    target = torch.tensor(
        [
            [4, 4, 6, 6],
            [4, 255, 6, 4],
            [4, 4, 4, 4],
        ]
    )
    # Scored pixels: class 4 has 8, class 6 has 3. IoU with class 4: cluster 0: 3/8, cluster 2: 3/8, cluster 3: 1/8,
    # cluster 1: 1/11; cluster 1 with class 6: 3/4. One-to-one: cluster 1 -> 6 and one of clusters 0 / 2 -> 4
    # (equal IoU); the rest -> void (C = 9).
    got = match_clusters(clusters, target, num_classes=9, ignore_index=255)
    assert (got[clusters == 1] == 6).all() and (got[clusters == 3] == 9).all()
    assert {int(got[0, 0]), int(got[2, 0])} == {4, 9}


def test_match_clusters_recovers_a_relabelled_map():
    rng = np.random.default_rng(2)
    target = torch.as_tensor(rng.integers(0, 5, (20, 20)))
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(match_clusters(perm[target], target, 5, 255), target)
