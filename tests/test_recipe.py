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


def test_a_stage_that_starts_after_a_lane_ends_gets_its_cores(tmp_path):
    import threading

    from autoseg.recipes.common import StageLog, run_lanes

    other_lane_done = threading.Event()
    threads = {}

    def run(stage, n):
        threads[stage] = n
        if stage == "b1":
            other_lane_done.set()
        if stage == "a1":
            assert other_lane_done.wait(10)

    failures = run_lanes([["a1", "a2"], ["b1"]], run, StageLog(tmp_path / "recipe.json"), jobs=2, cpus=4)
    # a1 and b1 share the cores; a2 starts after lane b has ended: all four
    assert failures == [] and threads == {"a1": 2, "b1": 2, "a2": 4}
    threads.clear()
    run_lanes([["a1", "a2"], ["b1"]], lambda s, n: threads.__setitem__(s, n), StageLog(tmp_path / "r2.json"), 1, 4)
    assert threads == {"a1": 4, "a2": 4, "b1": 4}  # one lane at a time: every core
