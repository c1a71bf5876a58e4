"""The shipped demo models (ShapesWorld, trained from scratch by ``python -m autoseg.recipes.shapes --ship``) name and
segment the sample images with no network, through ``infer.py --preset demo`` and ``eval.py --preset demo``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.config import load_config
from autoseg.data.shapes import ShapesConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "shapes"
THINGS = set(ShapesConfig().things)
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=OFFLINE)


def test_demo_preset_is_shipped_small_and_local():
    config = load_config(preset="demo")
    models = [Path(config.blip), Path(config.segmenter.source), Path(config.enhancer)]
    assert all(p.exists() and REPO in p.parents for p in models), models
    size = sum(f.stat().st_size for p in models for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    assert size < 25 * 2**20, f"demo models take {size / 2**20:.1f} MB"


def test_infer_preset_demo_names_the_shapes_in_most_samples(tmp_path):
    out = tmp_path / "out"
    result = run("infer.py", str(SAMPLES / "images"), "-o", str(out), "--preset", "demo")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    captions = sorted((SAMPLES / "captions").glob("*.json"))
    assert len(captions) == 6
    named_things = 0
    for path in captions:
        present = {r["class"] for r in json.loads(path.read_text())["regions"]}
        pred = json.loads((out / f"{path.stem}.json").read_text())
        vocabulary = set(pred["vocabulary"])
        assert vocabulary & (present - THINGS), (path.stem, sorted(vocabulary), sorted(present))  # some stuff named
        named_things += bool(vocabulary & present & THINGS)
        labels = np.array(Image.open(out / f"{path.stem}.png"))
        assert labels.shape == (128, 128) and labels.max() <= len(pred["vocabulary"])
    assert named_things >= 4, f"only {named_things} of 6 samples have one of their shapes named"


def test_eval_preset_demo_scores_the_samples_offline(tmp_path):
    report = tmp_path / "report.json"
    result = run(
        "eval.py",
        "--dataset",
        "folder",
        "--root",
        str(SAMPLES),
        "--preset",
        "demo",
        "--report",
        str(report),
        "--mapper",
        "embedding",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(report.read_text())
    assert figures["n_images"] == 6 and figures["missing_predictions"] == []
    # generated names are the class names themselves, so LAVE maps each to itself
    assert all(name == cls for name, cls in figures["mapping"].items() if cls is not None)
    assert figures["mIoU"] > 30
