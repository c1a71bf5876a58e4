"""eval.py --dataset video-folder: mIoU over all frames and flicker, against a hand count and a naive reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval import main  # the top-level eval.py entry point, loaded by path

from autoseg.data.video_datasets import video_folder
from autoseg.outputs import Prediction, write_prediction

CLASSES = ["cat", "dog", "bird"]


def write_clip_truth(root: Path, name: str, masks: list[np.ndarray]) -> None:
    (root / "masks" / name).mkdir(parents=True, exist_ok=True)
    (root / "frames" / name).mkdir(parents=True, exist_ok=True)
    for t, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8), mode="L").save(root / "masks" / name / f"{t:06d}.png")
        Image.fromarray(np.full((*m.shape, 3), 100, np.uint8)).save(root / "frames" / name / f"{t:06d}.png")


def write_clip_prediction(out: Path, name: str, vocabulary: list[str], maps: list[np.ndarray]) -> None:
    """The clip layout written by hand: label maps NAME/000000.png ... and one vocabulary in NAME.json."""
    (out / name).mkdir(parents=True, exist_ok=True)
    for t, m in enumerate(maps):
        Image.fromarray(m.astype(np.uint8), mode="L").save(out / name / f"{t:06d}.png")
    (out / f"{name}.json").write_text(json.dumps({"vocabulary": vocabulary, "fps": 10.0, "frames": len(maps)}))


def run_eval(root: Path, preds: Path, report: Path, *extra: str) -> dict:
    argv = ["--dataset", "video-folder", "--root", str(root), "--predictions", str(preds), "--mapper", "exact"]
    assert main([*argv, "--report", str(report), "--no-progress", *extra]) == 0
    return json.loads(report.read_text())


def test_flicker_and_miou_of_a_hand_made_clip(tmp_path):
    root, preds = tmp_path / "ds", tmp_path / "preds"
    (tmp_path / "ds").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    gt = np.array([[0, 0, 1], [0, 255, 1]])  # 2 x 3: three cat, two dog, one pixel ignored
    write_clip_truth(root, "a", [gt, gt, gt])
    # frame 0 right; frame 1 names one cat pixel "dog"; frame 2 leaves it unlabelled (0)
    p0 = np.array([[1, 1, 2], [1, 1, 2]])
    p1 = np.array([[2, 1, 2], [1, 1, 2]])
    p2 = np.array([[0, 1, 2], [1, 1, 2]])
    write_clip_prediction(preds, "a", ["cat", "dog"], [p0, p1, p2])
    report = run_eval(root, preds, tmp_path / "out" / "report.json")
    # stable pixels: 5 per pair (the ignored one never counts); one changes in each pair -> 2 / 10
    assert report["flicker"] == pytest.approx(20.0)
    assert report["per_clip"]["a"]["flicker"] == pytest.approx(20.0)
    # cat: 9 true pixels over 3 frames, 7 predicted (all right) -> 7 / 9; dog: 6 true, 6 + 1 predicted -> 6 / 7
    assert report["per_class"]["cat"] == pytest.approx(100 * 7 / 9)
    assert report["per_class"]["dog"] == pytest.approx(100 * 6 / 7)
    assert report["n_frames"] == 3 and report["n_clips"] == 1 and report["n_stable_pixel_pairs"] == 10
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 20.00 |" in md and "report_strip.png" in md
    strip = Image.open(tmp_path / "out" / "report_strip.png")
    assert strip.size == (3 * 3, 3 * 2)  # three frames side by side; rows: frame, truth, prediction


def naive(truth: dict, preds: dict, classes: list[str]) -> tuple[float, float]:
    """Independent route: per pixel, per frame, names looked up by hand in Python dictionaries."""
    n = len(classes)
    tp, gt_n, pred_n = [0] * n, [0] * n, [0] * n
    changed = stable = 0
    for name, masks in truth.items():
        per_frame_names = []
        for t, mask in enumerate(masks):
            label_map, vocab = preds[name][t]
            words = []
            for g, lab in zip(mask.ravel().tolist(), label_map.ravel().tolist(), strict=True):
                word = vocab[lab - 1] if lab > 0 else None
                cls = classes.index(word) if word in classes else None
                words.append(cls)
                if g == 255:
                    continue
                gt_n[g] += 1
                if cls is not None:
                    pred_n[cls] += 1
                    tp[g] += int(cls == g)
            per_frame_names.append(words)
        for t in range(len(masks) - 1):
            g0, g1 = masks[t].ravel().tolist(), masks[t + 1].ravel().tolist()
            for i in range(len(g0)):
                if g0[i] == g1[i] != 255:
                    stable += 1
                    changed += int(per_frame_names[t][i] != per_frame_names[t + 1][i])
    ious = [tp[c] / (gt_n[c] + pred_n[c] - tp[c]) for c in range(n) if gt_n[c] + pred_n[c] - tp[c] > 0]
    return 100 * float(np.mean(ious)), 100 * changed / stable


def test_random_clips_match_a_naive_count_with_clip_and_per_frame_vocabularies(tmp_path):
    rng = np.random.default_rng(0)
    root, preds = tmp_path / "ds", tmp_path / "preds"
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    truth, predicted = {}, {}
    for name, frames in (("clip_a", 4), ("clip_b", 3)):
        masks = []
        base = rng.integers(0, 2, size=(5, 7))
        for _ in range(frames):  # mostly stable truth with some changes and ignored pixels
            m = np.where(rng.random((5, 7)) < 0.2, rng.integers(0, 3, size=(5, 7)), base)
            m[rng.random((5, 7)) < 0.1] = 255
            masks.append(m)
        write_clip_truth(root, name, masks)
        truth[name] = masks
    vocab_a = ["dog", "cat", "sky"]  # one clip vocabulary ("sky" maps to nothing)
    maps_a = [rng.integers(0, 4, size=(5, 7)) for _ in range(4)]
    write_clip_prediction(preds, "clip_a", vocab_a, maps_a)
    predicted["clip_a"] = [(m, vocab_a) for m in maps_a]
    predicted["clip_b"] = []
    for t in range(3):  # per-frame vocabularies, as infer.py writes for the frames as separate images
        vocab = [["bird", "cat"], ["cat", "dog", "tree"], ["dog"]][t]
        m = rng.integers(0, len(vocab) + 1, size=(5, 7))
        image = Image.open(root / "frames" / "clip_b" / f"{t:06d}.png").convert("RGB")
        write_prediction(preds, f"clip_b/{t:06d}", image, "frame.png", Prediction(vocab, m))
        predicted["clip_b"].append((m, vocab))
    report = run_eval(root, preds, tmp_path / "report.json")
    miou, flicker = naive(truth, predicted, CLASSES)
    assert report["mIoU"] == pytest.approx(miou) and report["flicker"] == pytest.approx(flicker)
    assert report["n_frames"] == 7 and report["missing_predictions"] == []


def test_missing_frames_and_usage_errors(tmp_path, capsys):
    root, preds = tmp_path / "ds", tmp_path / "preds"
    root.mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    gt = np.zeros((2, 2), np.int64)
    write_clip_truth(root, "a", [gt, gt])
    write_clip_prediction(preds, "a", ["cat"], [np.ones((2, 2))])  # frame 1 was never written
    report = run_eval(root, preds, tmp_path / "r.json")
    assert report["missing_predictions"] == ["a/000001"] and report["per_class"]["cat"] == pytest.approx(50.0)
    assert report["flicker"] == pytest.approx(100.0)  # cat -> unlabelled on all 4 stable pixels
    capsys.readouterr()
    argv = ["--dataset", "video-folder", "--root", str(root), "--mapper", "exact", "--report", str(tmp_path / "x.json")]
    assert main(argv) == 2  # video scoring needs --predictions
    assert "--predictions" in capsys.readouterr().err
    assert main([*argv, "--predictions", str(preds), "--missing", "error"]) == 1
    assert "a/000001" in capsys.readouterr().err
    assert len(video_folder(root).clips) == 1 and not math.isnan(report["mIoU"])
