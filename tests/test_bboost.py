"""BBoost grouping: k-means, Hungarian alignment, soft labels, dense CRF, majority filter, end to end."""

import itertools

import numpy as np
import pytest
import torch

from autoseg.vocab.bboost import (
    BBoost,
    BBoostConfig,
    dense_crf,
    hungarian_align,
    kmeans,
    majority_filter,
    relabel_consecutive,
    resize_labels,
    sine_position_code,
    soft_labels,
)


def same_partition(a, b) -> bool:
    """True when label arrays a and b induce the same partition (labels equal up to renaming)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_hand_example():
    # two obvious pairs; the centres are the pair means (0, 0.5) and (10, 10.5)
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 10.0], [10.0, 11.0]])
    labels, centres = kmeans(x, 2, n_init=3, generator=torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] != labels[2] == labels[3]
    got = sorted(centres.tolist())
    assert np.allclose(got, [[0.0, 0.5], [10.0, 10.5]])


def test_kmeans_recovers_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    true = np.repeat([0, 1, 2], 50)
    means = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0]], dtype=np.float32)
    x = torch.tensor(means[true] + rng.normal(0, 0.5, (150, 3)).astype(np.float32))
    a, _ = kmeans(x, 3, n_init=4, generator=torch.Generator().manual_seed(1))
    b, _ = kmeans(x, 3, n_init=4, generator=torch.Generator().manual_seed(1))
    assert same_partition(a.numpy(), true)
    assert torch.equal(a, b)


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(torch.zeros(3, 2), 4)


def test_relabel_consecutive_orders_by_first_appearance():
    labels = torch.tensor([[7, 7, 2], [9, 2, 2]])
    assert relabel_consecutive(labels).tolist() == [[0, 0, 1], [2, 1, 1]]


def test_hungarian_undoes_a_permutation():
    ref = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    perm = torch.tensor([3, 0, 2, 1])  # old label -> new label
    assert torch.equal(hungarian_align(perm[ref], ref), ref)


def test_hungarian_with_fewer_labels_maps_to_best_overlap():
    ref = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]])
    coarse = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    # coarse label 0 covers exactly ref label 2 (IoU 1); coarse label 1 covers ref 0 and 1 (IoU 0.5 each)
    aligned = hungarian_align(coarse, ref, 3)
    assert (aligned[2:] == 2).all()
    assert aligned[0, 0] in (0, 1) and (aligned[:2] == aligned[0, 0]).all()


def test_soft_labels_count_aligned_votes():
    ref = torch.tensor([[0, 0, 1], [0, 2, 1], [2, 2, 1]])
    renamed = torch.tensor([2, 0, 1])[ref]  # same partition, other names
    changed = ref.clone()
    changed[0, 0] = 1  # one pixel disagrees
    probs = soft_labels([ref, renamed, changed])
    assert probs.shape == (3, 3, 3)
    assert torch.allclose(probs.sum(0), torch.ones(3, 3))
    # pixel (0,0): two of three maps say label 0 (the reference's first label), one says label 1
    assert probs[:, 0, 0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert probs[:, 2, 2].tolist() == pytest.approx([0.0, 1.0, 0.0])


def noisy_halves(h=10, w=14, k=3, flip=0.1, conf=0.6, seed=0):
    """Clean map: left half 0, right half 1 (label 2 unused); observed map with some pixels flipped."""
    clean = torch.zeros(h, w, dtype=torch.long)
    clean[:, w // 2 :] = 1
    g = torch.Generator().manual_seed(seed)
    noisy = clean.clone()
    flips = torch.rand(h, w, generator=g) < flip
    noisy[flips] = torch.randint(0, k, (int(flips.sum()),), generator=g)
    probs = torch.full((k, h, w), (1 - conf) / (k - 1))
    probs.scatter_(0, noisy[None], conf)
    return clean, noisy, probs


def test_dense_crf_removes_noise_and_keeps_the_class_axis_first():
    clean, noisy, probs = noisy_halves(flip=0.25)
    assert (noisy != clean).sum() > 15
    refined = dense_crf(probs, weight=6.0, theta=0.8, iters=5)
    assert refined.shape == probs.shape  # K x H x W with K != H != W
    assert torch.allclose(refined.sum(0), torch.ones(clean.shape), atol=1e-5)
    assert (refined.argmax(0) != clean).sum() < (noisy != clean).sum() / 3


def test_dense_crf_keeps_a_clean_confident_map():
    clean, _, probs = noisy_halves(flip=0.0, conf=0.9)
    assert torch.equal(dense_crf(probs).argmax(0), clean)


def test_majority_filter_removes_speckle_and_is_stable():
    labels = torch.zeros(7, 7, dtype=torch.long)
    labels[:, 4:] = 1
    speckled = labels.clone()
    speckled[1, 1] = 1  # isolated pixel inside region 0
    speckled[5, 5] = 0  # isolated pixel inside region 1
    out = majority_filter(speckled)
    assert torch.equal(out, labels)
    assert torch.equal(majority_filter(out), out)  # a fixed point


def test_resize_labels_up_and_down():
    small = torch.tensor([[0, 1], [2, 3]])
    up = resize_labels(small, (4, 4))
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert torch.equal(resize_labels(up, (2, 2)), small)


def test_sine_position_code_shape_and_norm():
    code = sine_position_code(4, 6, 32)
    assert code.shape == (24, 32)
    assert torch.allclose(code.norm(dim=1), torch.ones(24), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        sine_position_code(4, 4, 30)


def region_tokens(grid, layout, dim=16, noise=0.05, seed=0):
    """Tokens on ``grid`` whose content depends only on the region id given by ``layout(y, x)``."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(8, dim, generator=g)
    ids = torch.tensor([[layout(y / grid[0], x / grid[1]) for x in range(grid[1])] for y in range(grid[0])])
    tokens = protos[ids.flatten()] + noise * torch.randn(grid[0] * grid[1], dim, generator=g)
    return tokens, ids


@pytest.mark.parametrize("k_max", [2, 4])
def test_bboost_finds_regions_across_scales(k_max):
    quadrants = k_max == 4

    def layout(y, x):
        return (2 * (y >= 0.5) + (x >= 0.5)) if quadrants else int(x >= 0.5)

    grids = [(8, 8), (12, 12)]
    toks = [region_tokens(g, layout, seed=i)[0] for i, g in enumerate(grids)]
    truth = region_tokens(grids[1], layout)[1]
    cfg = BBoostConfig(k_min=2, k_max=k_max, n_init=4, pos_dim=16, pos_weight=0.1)
    out = BBoost(cfg)(toks, grids, seed=0)
    assert out.shape == (12, 12)
    if not quadrants:
        assert same_partition(out.numpy(), truth.numpy())
    else:
        # each true region is named by a different majority label, and >= 90% of pixels carry it (the CRF may
        # move a boundary between regions with weak votes by one row)
        majority = {r: np.bincount(out[truth == r].numpy()).argmax() for r in range(4)}
        assert len(set(majority.values())) == 4
        agree = sum(int((out[truth == r] == majority[r]).sum()) for r in range(4))
        assert agree >= 0.9 * truth.numel()
    assert torch.equal(out, BBoost(cfg)(toks, grids, seed=0))  # seeded


def test_bboost_rejects_bad_k_range():
    with pytest.raises(ValueError, match="k_min <= k_max"):
        BBoost(BBoostConfig(k_min=5, k_max=3))


def test_label_maps_cover_every_scale_and_k():
    grids = [(4, 4), (6, 6)]
    toks = [torch.randn(g[0] * g[1], 8) for g in grids]
    maps = BBoost(BBoostConfig(k_min=2, k_max=4, n_init=2, pos_dim=8)).label_maps(toks, grids, seed=3)
    assert len(maps) == 2 * 3
    assert all(m.shape == (6, 6) for m in maps)
    counts = [len(torch.unique(m)) for m in maps]
    assert all(c <= k for c, k in zip(counts, itertools.cycle([2, 3, 4])))
