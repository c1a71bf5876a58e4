"""``benchmarks/bench_infer.py`` on tiny models: the three flows agree on the timed path, the report has its keys, the
``[SEP]`` calibration gives captions of real length, and the identity check tells ties from real differences."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_infer  # noqa: E402
from infer_flows import Output  # noqa: E402
from infer_models import CALIBRATION_FILE, calibration_states, sampled_new_tokens, save_models  # noqa: E402

from autoseg.models.blip import CaptionConfig, load_blip  # noqa: E402
from autoseg.models.segmenters.clipseg import CLIPSegSegmenter  # noqa: E402
from autoseg.pipeline import STAGES  # noqa: E402

TINY = ["--blip", "tiny", "--clipseg", "tiny", "--scales", "64", "96"]


def test_three_flows_agree_on_the_timed_path_and_the_report_has_its_keys(tmp_path):
    out = tmp_path / "out.json"
    result = bench_infer.main([*TINY, "--images", "2", "--repeats", "2", "--batch-size", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in (
        "speedup_vs_original",
        "speedup_vs_hf_batched",
        "identical",
        "caption_new_tokens_mean",
        "repeats",
        "original_segment_image_encodes_per_image",
        "stages",
        "seconds_per_image",
    ):
        assert key in result, key
    flows = {"original", "hf_batched", "ours"}
    assert result["identical"] is True, result["identity"]
    assert set(result["identity"]) == {"ours~original", "hf_batched~original", "ours~hf_batched"}
    assert result["repeats"] == 2
    assert result["original_segment_image_encodes_per_image"] == 1
    assert result["segment_image_encodes_per_image"] == dict.fromkeys(flows, 1)
    assert set(result["stages"]) == flows and all(set(s) == set(STAGES) for s in result["stages"].values())
    for flow, spi in result["seconds_per_image"].items():
        assert len(spi["runs"]) == 2 and spi["min"] <= spi["median"] <= spi["max"], flow
    tokens = result["caption_tokens"]  # the same captions in every flow: the same tokens
    assert tokens["original"]["new_tokens_mean"] == tokens["hf_batched"]["new_tokens_mean"]
    assert tokens["ours"]["new_tokens_mean"] == result["caption_new_tokens_mean"] > 0
    assert tokens["original"]["row_steps_per_caption"] == tokens["original"]["new_tokens_mean"]  # one row a call
    assert tokens["ours"]["row_steps_per_caption"] >= tokens["ours"]["new_tokens_mean"]


def test_sep_calibration_gives_captions_of_real_length(tmp_path):
    blip_dir, _ = save_models(tmp_path / "calibrated", "tiny", "tiny")
    record = json.loads((blip_dir / CALIBRATION_FILE).read_text())
    assert 9 <= record["new_tokens_mean"] <= 11 and record["sep_bias"] > 0
    cfg = CaptionConfig()

    def mean_tokens(folder: Path) -> float:  # loaded through AutoSeg's loader: the saved model carries the bias
        cap = load_blip(str(folder))
        states = calibration_states(cap.model, cap.processor)
        return float(sampled_new_tokens(cap.model, cap.prompt_ids(cfg.prompt), states, cfg).float().mean())

    assert mean_tokens(blip_dir) == record["new_tokens_mean"]
    raw_dir, _ = save_models(tmp_path / "raw", "tiny", "tiny", calibrate=False)
    assert mean_tokens(raw_dir) > 11  # a random decoder rarely ends a caption


def test_identity_check_tells_float_ties_from_real_differences():
    ref_logits = torch.tensor([[[1000.0, 2000.0]], [[1000.01, 0.0]]])  # 2 names x 1 x 2 pixels: pixel 0 is a tie
    noisy = ref_logits + torch.tensor([[[0.0, 0.0]], [[0.015, 0.0]]])  # rounding noise: under TIE of the size
    ref = Output(["a", "b"], np.array([[2, 1]], np.int32))  # the label maps at the logits' size (no upsampling)
    tie = bench_infer.compare_image(Output(["a", "b"], np.array([[1, 1]], np.int32)), ref, noisy, ref_logits)
    assert tie["ok"] and tie["differing"] == 1
    real = bench_infer.compare_image(Output(["a", "b"], np.array([[2, 2]], np.int32)), ref, noisy, ref_logits)
    assert not real["ok"]  # pixel 1: the reference's logits 2 and 0 are far apart
    assert not bench_infer.compare_image(Output(["b", "a"], ref.label_map), ref, noisy, ref_logits)["ok"]


def test_clear_cache_forgets_text_embeddings(tiny_clipseg_dir):
    seg = CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir))
    seg.segment([Image.new("RGB", (32, 32))], [["dog", "cat"]])
    assert len(seg._text_cache) == 2
    seg.clear_cache()
    assert len(seg._text_cache) == 0
