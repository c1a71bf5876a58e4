"""The ShapesWorld recipe end to end at a tiny scale (every stage, a few steps each): about a minute."""

import json

import pytest

from autoseg.config import load_config
from autoseg.recipes.shapes import STAGES, main


@pytest.mark.slow
def test_recipe_smoke_run_writes_every_stage(tmp_path):
    out = tmp_path / "recipe"
    assert main(["--out", str(out), "--scale", "0.005", "--heldout", "6"]) == 0
    log = json.loads((out / "recipe.json").read_text())
    assert set(log["seconds"]) == set(STAGES) and log["runs"][0]["from"] == "data" and log["runs"][0]["jobs"] == 2
    config = load_config(log["preset"])  # the assembled pipeline loads with its ./-relative model paths
    assert config.blip == str(out / "demo" / "blip") and (out / "demo" / "segmenter" / "model.safetensors").is_file()
    ev = log["evaluation"]
    assert 0 <= ev["mIoU"] <= 100 and set(ev["cluster_mIoU"]) == {"128", "192"}
    assert all(set(c) == {"enhanced", "identity"} for c in ev["cluster_mIoU"].values())
    assert (out / "eval" / "report.json").is_file()
