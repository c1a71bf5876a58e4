"""eval.py --predictions end to end on a folder dataset built in tmp_path, with predictions from write_prediction."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg.data.datasets import build_dataset
from autoseg.evaluate import evaluate_predictions
from autoseg.outputs import Prediction, write_prediction


def _load_entry_point():
    """``main`` of the top-level eval.py, loaded by path (the repository root need not be on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_entry", Path(__file__).resolve().parents[1] / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


main = _load_entry_point()

SIZES = {"img0": (7, 9), "sub/img1": (8, 5), "img2": (6, 6)}  # name -> (H, W); img2 gets no prediction


class ExactStandIn:
    """Test double of a LAVE mapper for the library-level test: a name maps to the class of that name, else None."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}

    def map_names(self, names: Sequence[str], classes: Sequence[str], dataset: str) -> dict[str, int | None]:
        out = {n: (list(classes).index(n) if n in classes else None) for n in names}
        self.records.update({n: {"class": c, "source": "exact", "raw": None} for n, c in out.items()})
        return out


def make_dataset(root: Path, classes: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Folder dataset: random masks over classes 0 and 1 only (class 2 never in the ground truth) with ignore pixels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    masks = {}
    for name, (h, w) in SIZES.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        mask = rng.integers(0, 2, size=(h, w))
        mask[rng.random((h, w)) < 0.2] = 255
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"{name}.png")
        masks[name] = mask
    return masks


VOCABS = {"img0": ["cat", "sky", "dog"], "sub/img1": ["bird", "dog", "tree", "cat"]}


def make_predictions(pred_dir: Path, root: Path, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = {}
    for name, vocab in VOCABS.items():
        h, w = SIZES[name]
        label_map = rng.integers(0, len(vocab) + 1, size=(h, w))  # 0 = unlabelled
        image = Image.open(root / "images" / f"{name}.jpg").convert("RGB")
        write_prediction(pred_dir, name, image, str(root / "images" / f"{name}.jpg"), Prediction(vocab, label_map))
        maps[name] = label_map
    return maps


def naive_miou(masks, maps, classes, background: int | None, rule: str) -> tuple[float, list[float]]:
    """Independent route: per pixel, look the name up by hand and count tp / gt / pred in Python dictionaries."""
    n = len(classes)
    tp, gt_n, pred_n = [0] * n, [0] * n, [0] * n
    for name, mask in masks.items():
        label_map = maps.get(name, np.zeros_like(mask))  # a missing prediction = all unlabelled
        vocab = VOCABS.get(name, [])
        for g, lab in zip(mask.ravel().tolist(), label_map.ravel().tolist(), strict=True):
            if g == 255:
                continue
            word = vocab[lab - 1] if lab > 0 else None
            p = classes.index(word) if word in classes else background  # None = miss
            gt_n[g] += 1
            if p is not None:
                pred_n[p] += 1
                tp[g] += int(p == g)
    ious = []
    for c in range(n):
        union = gt_n[c] + pred_n[c] - tp[c]
        skip = union == 0 or (rule == "detectron2" and gt_n[c] == 0)
        ious.append(float("nan") if skip else tp[c] / union)
    return float(np.nanmean(ious)), ious


@pytest.mark.parametrize("rule", ["mmseg", "detectron2"])
def test_eval_predictions_reproduces_naive_miou(tmp_path: Path, rule: str):
    classes = ["cat", "dog", "bird"]
    root, preds = tmp_path / "ds", tmp_path / "preds"
    masks = make_dataset(root, classes)
    maps = make_predictions(preds, root)
    report_path = tmp_path / "out" / "report.json"
    argv = ["--predictions", str(preds), "--dataset", "folder", "--root", str(root), "--mapper", "exact"]
    argv += [
        "--report",
        str(report_path),
        "--absent-rule",
        rule,
        "--tensorboard",
        str(tmp_path / "tb"),
        "--no-progress",
    ]
    assert main(argv) == 0

    expected, ious = naive_miou(masks, maps, classes, background=None, rule=rule)
    report = json.loads(report_path.read_text())
    assert report["mIoU"] == pytest.approx(100 * expected, abs=1e-6)
    for c, iou in zip(classes, ious, strict=True):
        assert (
            (report["per_class"][c] is None) if math.isnan(iou) else report["per_class"][c] == pytest.approx(100 * iou)
        )
    # bird is predicted but never in the ground truth: IoU 0 under mmseg, skipped under detectron2
    assert report["per_class"]["bird"] == (0.0 if rule == "mmseg" else None)
    assert report["missing_predictions"] == ["img2"] and report["n_images"] == 3
    assert report["mapping"] == {"bird": "bird", "cat": "cat", "dog": "dog", "sky": None, "tree": None}
    assert report["dataset"] == "folder" and report["mapper"] == "exact" and report["absent_rule"] == rule
    for key in ("pixel_acc", "mean_acc", "fwIoU"):
        assert 0 <= report[key] <= 100

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| mIoU | pixel acc | mean acc | fwIoU |" in md and f"| {report['mIoU']:.2f} |" in md
    assert "| sky | (background / void) |" in md and "- img2" in md
    with Image.open(tmp_path / "out" / "report_iou.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Scalars("eval/folder/mIoU")[0].value == pytest.approx(report["mIoU"], rel=1e-6)


def test_eval_scored_background_takes_unlabelled_and_void(tmp_path: Path):
    # classes: background (scored), cat, dog. "sky"/"tree" and unlabelled pixels become background predictions.
    classes = ["background", "cat", "dog"]
    root, preds = tmp_path / "ds", tmp_path / "preds"
    masks = make_dataset(root, classes, seed=3)
    maps = make_predictions(preds, root, seed=4)
    mapper = ExactStandIn()
    report = evaluate_predictions(preds, build_dataset("folder", root), mapper, progress=False)
    expected, _ = naive_miou(masks, maps, classes, background=0, rule="mmseg")
    assert report["mIoU"] == pytest.approx(100 * expected, abs=1e-6)
    assert report["mapping"]["sky"] is None and report["mapping_records"]["cat"]["source"] == "exact"


def test_eval_limit_and_missing_error(tmp_path: Path, capsys):
    root, preds = tmp_path / "ds", tmp_path / "preds"
    make_dataset(root, ["cat", "dog", "bird"])
    make_predictions(preds, root)
    base = [
        "--predictions",
        str(preds),
        "--dataset",
        "folder",
        "--root",
        str(root),
        "--mapper",
        "exact",
        "--no-progress",
    ]
    assert main([*base, "--report", str(tmp_path / "r1.json"), "--limit", "2"]) == 0
    report = json.loads((tmp_path / "r1.json").read_text())
    assert report["n_images"] == 2 and report["missing_predictions"] == ["img2"]  # sorted names: img0, img2, sub/img1
    capsys.readouterr()
    assert main([*base, "--report", str(tmp_path / "r2.json"), "--missing", "error"]) == 1
    err = capsys.readouterr().err
    assert "1 of 3 images have no prediction" in err and "img2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r2.json").exists()


def test_eval_exit_codes(tmp_path: Path, capsys):
    root, preds = tmp_path / "ds", tmp_path / "preds"
    make_dataset(root, ["cat", "dog", "bird"])
    make_predictions(preds, root)
    report = tmp_path / "r.json"

    def run(predictions: Path | None, dataset_root: Path, *extra: str) -> int:
        argv = ["--dataset", "folder", "--root", str(dataset_root), "--mapper", "exact", "--report", str(report)]
        argv += ["--no-progress", *extra]
        return main(argv + (["--predictions", str(predictions)] if predictions is not None else []))

    # usage errors -> 2
    assert main(["--predictions", str(preds), "--root", str(root)]) == 2  # no --dataset
    assert main(["--predictions", str(preds), "--dataset", "coco", "--root", str(root)]) == 2
    assert run(preds, root, "--limit", "0") == 2
    assert run(preds, root, "--absent-rule", "coco") == 2
    capsys.readouterr()
    # pipeline mode with a model that cannot be loaded: a usage/setup error naming it
    assert run(None, root, "--blip", str(tmp_path / "no_blip")) == 2
    assert "no_blip" in capsys.readouterr().err
    # data errors -> 1 with a one-line message
    assert run(preds, tmp_path / "no") == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and "no: folder dataset root not found" in err
    assert len(err.strip().splitlines()) == 1
    assert run(tmp_path / "none", root) == 1
    assert "predictions folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty, root) == 1
    assert "no prediction for any of the 3 images" in capsys.readouterr().err
    # a prediction of the wrong size -> 1, naming the file; no report is written
    Image.fromarray(np.zeros((3, 3), np.uint8), mode="L").save(preds / "img0.png")
    assert run(preds, root) == 1
    assert "img0.png: prediction is 3x3 (WxH) but the ground truth" in capsys.readouterr().err
    assert not report.exists()


def test_pipeline_mode_writes_predictions_and_scores_them(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    """Without --predictions, eval.py runs the shared pipeline on the dataset and scores what it wrote."""
    root = tmp_path / "ds"
    make_dataset(root, ["dog", "cat", "sky"])
    report = tmp_path / "run" / "report.json"
    argv = ["--dataset", "folder", "--root", str(root), "--mapper", "exact", "--report", str(report), "--no-progress"]
    argv += ["--config", "configs/debug/pipeline.yaml", "--blip", str(tiny_blip_dir)]
    argv += ["--segmenter", str(tiny_clipseg_dir), "--seed", "1"]
    assert main(argv) == 0
    pred_dir = tmp_path / "run" / "report_predictions"
    assert sorted(p.relative_to(pred_dir).as_posix() for p in pred_dir.rglob("*.png")) == [
        "img0.png",
        "img2.png",
        "sub/img1.png",
    ]
    first = json.loads(report.read_text())
    assert first["n_images"] == 3 and first["missing_predictions"] == []
    # scoring the saved folder again gives the same figures (the pipeline mode is infer.py + --predictions)
    again = tmp_path / "again.json"
    assert main([*argv[:6], "--report", str(again), "--no-progress", "--predictions", str(pred_dir)]) == 0
    second = json.loads(again.read_text())
    assert first["mIoU"] == second["mIoU"] and first["per_class"] == second["per_class"]
