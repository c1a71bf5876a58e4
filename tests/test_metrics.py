"""Tests of the dataset-level confusion-matrix metric and of the name -> dataset-id helper."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.metrics import DatasetIoU, confusion_matrix, metrics_from_confusion, to_dataset_ids

IGNORE = 255


def test_hand_computed_3x3():
    # 3 classes (0, 1, 2), void/miss = 3, ignore = 255.
    gt = torch.tensor([[0, 0, 1], [0, 1, 1], [2, IGNORE, 1]])
    pred = torch.tensor([[0, 1, 1], [0, 1, 3], [2, 2, 0]])
    # scored (gt, pred) pairs: (0,0) (0,1) (1,1) (0,0) (1,1) (1,3) (2,2) (1,0); the ignored pixel is dropped.
    # class 0: gt 3, predicted 3 [(0,0) (0,0) (1,0)], tp 2 -> union 3 + 3 - 2 = 4 -> IoU 2/4 = 0.5
    # class 1: gt 4 (the void pixel (1,3) included), predicted 3 [(0,1) (1,1) (1,1)], tp 2 -> union 5 -> IoU 0.4
    # class 2: gt 1, predicted 1 (the prediction on the ignored pixel does not count), tp 1 -> IoU 1.0
    # mIoU = (0.5 + 0.4 + 1) / 3; pixel acc = 5 / 8; accs 2/3, 2/4, 1/1; fwIoU = 3/8*0.5 + 4/8*0.4 + 1/8*1 = 0.5125
    metric = DatasetIoU(num_classes=3, ignore_index=IGNORE)
    metric.update(pred, gt)
    out = metric.compute()
    np.testing.assert_allclose(out["iou"].numpy(), [0.5, 0.4, 1.0])
    assert out["mIoU"].item() == pytest.approx(1.9 / 3)
    assert out["pixel_acc"].item() == pytest.approx(5 / 8)
    np.testing.assert_allclose(out["acc"].numpy(), [2 / 3, 0.5, 1.0])
    assert out["mean_acc"].item() == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert out["fwIoU"].item() == pytest.approx(0.5125)
    # the void column holds the miss, and is no class's false positive
    assert metric.confmat[1, 3].item() == 1 and metric.confmat[:, 3].sum().item() == 1


def test_hand_computed_absent_rules():
    # 4 classes; class 2 is predicted once but never in the ground truth; class 3 appears nowhere.
    gt = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])
    # class 0: gt 2, pred 1, tp 1 -> IoU 1/2; class 1: IoU 2/2 = 1; class 2: union 1, tp 0 -> 0 (mmseg) / NaN (d2)
    cm = confusion_matrix(pred, gt, num_classes=4)
    mm = metrics_from_confusion(cm, "mmseg")
    d2 = metrics_from_confusion(cm, "detectron2")
    assert mm["iou"][:3].tolist() == [0.5, 1.0, 0.0] and math.isnan(mm["iou"][3])
    assert mm["mIoU"] == pytest.approx(0.5)  # (0.5 + 1 + 0) / 3
    assert d2["iou"][:2].tolist() == [0.5, 1.0] and np.isnan(d2["iou"][2:]).all()
    assert d2["mIoU"] == pytest.approx(0.75)  # (0.5 + 1) / 2
    for r in (mm, d2):  # accuracy and fwIoU agree: both only weigh classes with ground truth
        assert r["pixel_acc"] == pytest.approx(3 / 4)
        assert r["mean_acc"] == pytest.approx(0.75)
        assert r["fwIoU"] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def naive_reference(preds: np.ndarray, gts: np.ndarray, n: int, ignore: int, rule: str) -> dict:
    """Per-class counts with separate np.bincount calls over all scored pixels (no confusion matrix)."""
    p, g = preds.ravel(), gts.ravel()
    keep = g != ignore
    p, g = p[keep], g[keep]
    gt_area = np.bincount(g, minlength=n)[:n].astype(float)
    pred_area = np.bincount(p, minlength=n + 1)[:n].astype(float)  # drop the void id n
    tp = np.bincount(g[p == g], minlength=n)[:n].astype(float)
    ious, accs = [], []
    for c in range(n):
        union = gt_area[c] + pred_area[c] - tp[c]
        if rule == "detectron2" and gt_area[c] == 0:
            ious.append(float("nan"))
        else:
            ious.append(tp[c] / union if union > 0 else float("nan"))
        accs.append(tp[c] / gt_area[c] if gt_area[c] > 0 else float("nan"))
    ious, accs = np.array(ious), np.array(accs)
    freq = gt_area / gt_area.sum()
    ok = ~np.isnan(ious)
    return {
        "iou": ious,
        "mIoU": np.nanmean(ious),
        "pixel_acc": tp.sum() / gt_area.sum(),
        "mean_acc": np.nanmean(accs),
        "fwIoU": float(np.sum(freq[ok] * ious[ok])),
    }


def random_maps(seed: int, n_images: int = 6, n: int = 7, size=(13, 11)) -> tuple[np.ndarray, np.ndarray]:
    """Random maps with ignore pixels, void predictions, class 5 absent from the ground truth, class 6 nowhere."""
    rng = np.random.default_rng(seed)
    gts = rng.integers(0, 5, size=(n_images, *size))  # classes 0..4 in the ground truth
    gts[rng.random(gts.shape) < 0.15] = IGNORE
    preds = rng.integers(0, 6, size=(n_images, *size))  # 0..5: class 5 predicted but never true
    preds[rng.random(preds.shape) < 0.1] = n  # void / miss
    agree = rng.random(gts.shape) < 0.5  # make the IoUs non-trivial
    preds[agree & (gts != IGNORE)] = gts[agree & (gts != IGNORE)]
    return preds, gts


@pytest.mark.parametrize("rule", ["mmseg", "detectron2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_maps_match_naive_bincount(rule: str, seed: int):
    n = 7
    preds, gts = random_maps(seed, n=n)
    metric = DatasetIoU(num_classes=n, ignore_index=IGNORE, absent_rule=rule)
    for p, g in zip(preds, gts, strict=True):  # one image at a time: the state accumulates over the dataset
        metric.update(torch.from_numpy(p), torch.from_numpy(g))
    out = metric.compute()
    ref = naive_reference(preds, gts, n, IGNORE, rule)
    np.testing.assert_allclose(out["iou"].numpy(), ref["iou"], rtol=0, atol=1e-12)
    for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
        assert out[key].item() == pytest.approx(ref[key], abs=1e-12), key
    assert math.isnan(out["iou"][6].item())  # nowhere: skipped by both rules
    if rule == "mmseg":
        assert out["iou"][5].item() == 0.0  # predicted but absent from ground truth
    else:
        assert math.isnan(out["iou"][5].item())


def test_dataset_level_not_per_image_mean():
    # image 1: class 0 perfect (100 px); image 2: class 0 half right (2 px of gt, 1 hit, 1 miss)
    m = DatasetIoU(num_classes=1)
    m.update(torch.zeros(10, 10, dtype=torch.long), torch.zeros(10, 10, dtype=torch.long))
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    # dataset level: tp 101, gt 102, pred 101 -> 101/102; a per-image mean would be (1 + 0.5) / 2
    assert m.compute()["mIoU"].item() == pytest.approx(101 / 102)


def test_input_errors():
    m = DatasetIoU(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"predicted ids \[4\]"):
        m.update(torch.tensor([[4]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"ground-truth ids \[3\]"):
        m.update(torch.tensor([[0]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="absent_rule"):
        DatasetIoU(num_classes=3, absent_rule="coco")
    with pytest.raises(ValueError, match="collides"):
        DatasetIoU(num_classes=300, ignore_index=255)
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = DatasetIoU(num_classes=2).compute()
    assert math.isnan(empty["mIoU"].item()) and math.isnan(empty["pixel_acc"].item())


def test_large_vocabulary_ignore_index():
    # ADE-847 style: class ids past 255, ignore 65535
    m = DatasetIoU(num_classes=847, ignore_index=65535)
    m.update(torch.tensor([[300, 846, 0]]), torch.tensor([[300, 65535, 1]]))
    out = m.compute()
    assert out["iou"][300].item() == 1.0 and out["iou"][1].item() == 0.0 and out["iou"][0].item() == 0.0
    assert out["mIoU"].item() == pytest.approx(1 / 3)  # classes 300 (1), 1 (0), 0 (0: predicted, absent)


def test_ddp_two_processes_match_single_process(tmp_path: Path):
    n, rule = 7, "mmseg"
    preds, gts = random_maps(seed=5, n_images=5, n=n)
    data = tmp_path / "data.npz"
    np.savez(data, preds=preds, targets=gts, num_classes=n, ignore_index=IGNORE, absent_rule=rule)
    script = Path(__file__).with_name("ddp_metric_script.py")
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(data)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ref = naive_reference(preds, gts, n, IGNORE, rule)
    single = DatasetIoU(n, IGNORE, rule)
    single.update(torch.from_numpy(preds), torch.from_numpy(gts))
    expected = single.compute()
    # the ranks saw different images, so their local matrices differ and add up to the single-process one
    local = [np.array(r["local_confmat"]) for r in ranks]
    assert not np.array_equal(local[0], local[1])
    np.testing.assert_array_equal(local[0] + local[1], single.confmat.numpy())
    for r in ranks:
        np.testing.assert_allclose(np.array(r["iou"], dtype=float), expected["iou"].numpy(), atol=1e-12)
        np.testing.assert_allclose(np.array(r["iou"], dtype=float), ref["iou"], atol=1e-12)
        for key in ("mIoU", "pixel_acc", "mean_acc", "fwIoU"):
            assert r[key] == pytest.approx(expected[key].item(), abs=1e-12)
            assert r[key] == pytest.approx(ref[key], abs=1e-12)


def test_to_dataset_ids_void_and_background():
    label_map = np.array([[0, 1, 2], [3, 3, 1]])  # 0 unlabelled, 1 puppy, 2 sky, 3 sofa
    vocabulary = ["puppy", "sky", "sofa"]
    mapping = {"puppy": 11, "sky": None, "sofa": 17}
    # VOC-20 style (no scored background, 20 classes): unlabelled and "sky" -> void id 20
    np.testing.assert_array_equal(
        to_dataset_ids(label_map, vocabulary, mapping, num_classes=20, background_index=None),
        [[20, 11, 20], [17, 17, 11]],
    )
    # VOC-21 style (background scored as 0): unlabelled and "sky" -> 0
    mapping21 = {"puppy": 12, "sky": None, "sofa": 18}
    np.testing.assert_array_equal(
        to_dataset_ids(label_map, vocabulary, mapping21, num_classes=21, background_index=0),
        [[0, 12, 0], [18, 18, 12]],
    )
    with pytest.raises(ValueError, match="'sky' has no entry"):
        to_dataset_ids(label_map, vocabulary, {"puppy": 1, "sofa": 2}, 20, None)
    with pytest.raises(ValueError, match="outside"):
        to_dataset_ids(label_map, vocabulary, {**mapping, "sofa": 20}, 20, None)
    with pytest.raises(ValueError, match="beyond"):
        to_dataset_ids(np.array([[4]]), vocabulary, mapping, 20, None)
