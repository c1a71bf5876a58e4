"""The adapt recipe: captions from masks, vocabulary growth, data view, stage configs, resume, reports, a smoke run."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from autoseg.lit.sources import grow_blip_vocabulary, missing_words
from autoseg.models.blip import BlipCaptioner
from autoseg.models.blip import load_blip as build_blip
from autoseg.models.scratch import make_blip
from autoseg.recipes import adapt, adapt_data


def make_folder(root, classes, n, size=16, seed=0, captions=False):
    """A tiny folder dataset: random masks over ``classes``, images coloured by class."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n):
        mask = rng.integers(0, len(classes), (size, size)).astype(np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i:03d}.png")
        Image.fromarray(np.stack([mask * 20] * 3, -1).astype(np.uint8)).save(root / "images" / f"{i:03d}.png")
        if captions:
            (root / "captions").mkdir(exist_ok=True)
            regions = [{"class": classes[0], "class_id": 0, "caption": "own words"}]
            (root / "captions" / f"{i:03d}.json").write_text(json.dumps({"caption": "x", "regions": regions}))
    return root


def test_region_captions_name_every_region_with_seeded_templates():
    classes = ["sky", "big red zorblat", "apple"]
    mask = np.array([[0, 0, 2], [2, 255, 0]], np.uint8)
    first = adapt.region_captions(mask, classes, np.random.default_rng([3, 7]))
    again = adapt.region_captions(mask, classes, np.random.default_rng([3, 7]))
    assert first == again and first["caption"] == ""
    assert [r["class_id"] for r in first["regions"]] == [0, 2]
    assert [r["class"] for r in first["regions"]] == ["sky", "apple"]
    assert "sky" in first["regions"][0]["caption"] and "apple" in first["regions"][1]["caption"]
    made = [adapt.region_captions(mask, classes, np.random.default_rng([s, 0])) for s in range(40)]
    texts = {m["regions"][1]["caption"] for m in made}
    assert texts == {t.format(a="an", name="apple") for t in adapt.CAPTION_TEMPLATES}  # several templates, "an apple"


def _check_growth(blip: BlipCaptioner, names, expect):
    tok = blip.processor.tokenizer
    decoder = blip.model.text_decoder
    old_emb = decoder.get_input_embeddings().weight.detach().clone()
    old_out = decoder.get_output_embeddings()
    old_w, old_b = old_out.weight.detach().clone(), old_out.bias.detach().clone()
    pieces = {w: tok.convert_tokens_to_ids(tok.tokenize(w)) for w in expect}
    assert missing_words(tok, names) == expect
    added = grow_blip_vocabulary(blip, names)
    assert added == expect
    n = len(tok)
    out = decoder.get_output_embeddings()
    assert decoder.get_input_embeddings().weight.shape[0] == n == out.weight.shape[0] == out.bias.shape[0]
    assert blip.model.config.text_config.vocab_size == n
    assert torch.equal(decoder.get_input_embeddings().weight[: len(old_emb)], old_emb)
    assert torch.equal(out.weight[: len(old_w)], old_w) and torch.equal(out.bias[: len(old_b)], old_b)
    for w in expect:
        assert tok.tokenize(w) == [w]  # now one whole-word token
        i = tok.convert_tokens_to_ids(w)
        torch.testing.assert_close(decoder.get_input_embeddings().weight[i], old_emb[pieces[w]].mean(0))
        torch.testing.assert_close(out.weight[i], old_w[pieces[w]].mean(0))
        torch.testing.assert_close(out.bias[i], old_b[pieces[w]].mean(0))
    assert grow_blip_vocabulary(blip, names) == []  # idempotent
    return added


def test_vocabulary_growth_bert_vocabulary_blip(tmp_path):
    blip = build_blip("scratch:tiny")  # BERT-base-uncased's vocabulary, as real BLIP checkpoints
    names = ["sky", "Zörblat", "brick wall", "quux-plonk"]
    _check_growth(blip, names, ["zorblat", "quux", "plonk"])
    assert blip.processor.tokenizer.tokenize("a ZORBLAT on the wall") == ["a", "zorblat", "on", "the", "wall"]
    blip.model.save_pretrained(tmp_path)
    blip.processor.save_pretrained(tmp_path)
    loaded = BlipCaptioner.from_pretrained(str(tmp_path))
    assert loaded.processor.tokenizer.tokenize("zorblat") == ["zorblat"]
    assert loaded.model.text_decoder.get_input_embeddings().weight.shape[0] == len(loaded.processor.tokenizer)


def test_vocabulary_growth_word_level_blip():
    torch.manual_seed(0)
    blip = BlipCaptioner(*make_blip(words=["a", "picture", "of", "sky", "heart"]))
    _check_growth(blip, ["sky", "heart", "blorp thing"], ["blorp", "thing"])
    ids = blip.processor.tokenizer("a picture of a blorp").input_ids
    assert blip.processor.tokenizer.decode(ids, skip_special_tokens=True) == "a picture of a blorp"


def test_prepare_data_view_captions_replay_and_weights(tmp_path):
    new = make_folder(tmp_path / "new", ["sky", "zorblat"], 30, captions=True)
    (new / "captions" / "005.json").unlink()  # one image without captions: taught from its mask
    old = make_folder(tmp_path / "old", ["grass", "sky"], 10, seed=1)
    info = adapt.prepare_data(new, tmp_path / "out", seed=0, replay=old, known=["sky", "grass"])
    assert info["classes"] == ["sky", "zorblat", "grass"] and info["train"] + info["val"] == 40
    assert info["val"] == 40 // adapt.VAL_EVERY and len(info["class_weights"]) == 3
    assert info["new_classes"] == ["zorblat"]
    train = tmp_path / "out" / "train"
    # every training image of the new folder shows a zorblat: listed NEW_REPEAT times, the replay images once
    repeats = sorted(p.name for p in (train / "masks").glob("*_repeat*.png"))
    assert info["repeats"] == len(repeats) == 29 * (adapt_data.NEW_REPEAT - 1)  # 30 images, 1 held out (index 19)
    assert len(list((train / "images").iterdir())) == len(list((train / "captions").iterdir())) == 38 + info["repeats"]
    assert (train / "captions" / "000_repeat1.json").read_text() == (train / "captions" / "000.json").read_text()
    assert not list((tmp_path / "out" / "val" / "masks").glob("*_repeat*"))
    boost = [adapt_data.NEW_CLASS_WEIGHT if c == "zorblat" else 1.0 for c in info["classes"]]
    assert info["feature_weights"] == [round(w * b, 3) for w, b in zip(info["class_weights"], boost, strict=True)]
    assert (train / "classes.txt").read_text().split() == ["sky", "zorblat", "grass"]
    assert json.loads((train / "captions" / "000.json").read_text())["regions"][0]["caption"] == "own words"
    from_mask = json.loads((train / "captions" / "005.json").read_text())
    assert {r["class"] for r in from_mask["regions"]} == {"sky", "zorblat"}
    src = np.asarray(Image.open(old / "masks" / "000.png"))
    remapped = np.asarray(Image.open(train / "masks" / "replay_000.png"))
    lut = {0: 2, 1: 0, 255: 255}  # grass -> 2, sky -> 0
    assert np.array_equal(remapped, np.vectorize(lut.get)(src))
    regions = json.loads((train / "captions" / "replay_000.json").read_text())["regions"]
    assert {r["class"] for r in regions} <= {"sky", "grass"}
    assert all(1.0 <= w <= 3.0 for w in info["class_weights"])
    assert adapt.prepare_data(new, tmp_path / "out2", seed=0, replay=old, known=["sky", "grass"]) == info
    plain = adapt.prepare_data(new, tmp_path / "out3", seed=0, replay=old)  # starting classes unknown: nothing new
    assert plain["new_classes"] == [] and plain["repeats"] == 0 and plain["feature_weights"] == plain["class_weights"]


def test_stage_configs_fill_in_sources_budgets_and_logger(tmp_path):
    path, settings = adapt.starting_pipeline("demo")
    assert path.name == "pipeline.yaml" and path.parent.name == "demo"
    settings["caption_scale"] = adapt.pick_caption_scale(settings, None)  # 192: the template's image_size
    data = {"classes": ["a", "b"], "class_weights": [1.0, 2.5], "feature_weights": [1.0, 5.0]}
    configs = adapt.stage_configs(tmp_path, settings, data, minutes=10, scale=0.5)
    assert set(configs) == {"captioner", "segmenter", "enhancer"}
    cap, seg, enh = configs["captioner"], configs["segmenter"], configs["enhancer"]
    template = yaml.safe_load((adapt.CONFIGS / "captioner.yaml").read_text())
    assert cap["trainer"]["max_steps"] == round(template["trainer"]["max_steps"] * 10 / 20 * 0.5)
    assert cap["trainer"]["max_time"] == "00:00:07:39"  # 0.85 of 10 minutes, times the margin 0.9
    assert enh["trainer"]["max_time"] == "00:00:01:21"  # 0.15 of 10 minutes, times the margin 0.9
    assert cap["model"]["init_args"]["aux_class_weights"] == [1.0, 5.0]
    assert cap["model"]["init_args"]["blip"] == str(tmp_path / "work" / "blip")
    assert cap["trainer"]["logger"]["init_args"] == {
        "save_dir": str(tmp_path / "captioner"),
        "name": "lightning_logs",
        "version": 0,
    }
    assert cap["data"]["train"]["root"] == str(tmp_path / "data" / "train")
    assert seg["model"]["init_args"]["segmenter"] == settings["segmenter"]["source"]
    assert seg["model"]["init_args"]["class_weights"] == [1.0, 2.5]
    assert seg["model"]["init_args"]["patch_class_weights"] == [1.0, 5.0]
    assert enh["model"]["init_args"]["blip"].startswith(str(tmp_path / "captioner"))
    init = next(c for c in enh["trainer"]["callbacks"] if c["class_path"].endswith("InitEnhancer"))
    assert init["init_args"]["path"] == settings["enhancer"] and enh["model"]["init_args"]["head_width"] == 128


def test_caption_scale_defaults_to_the_finest_and_scales_the_captioner_steps(tmp_path):
    _, settings = adapt.starting_pipeline("demo")
    assert settings["scales"] == [128, 192] and settings["caption_scale"] == 192
    assert adapt.pick_caption_scale(settings, None) == 192 and adapt.pick_caption_scale(settings, 128) == 128
    with pytest.raises(ValueError, match="not one of"):
        adapt.pick_caption_scale(settings, 160)
    data = {"classes": ["a", "b"], "class_weights": [1.0, 2.5]}
    template = {s: yaml.safe_load((adapt.CONFIGS / f"{s}.yaml").read_text()) for s in ("captioner", "enhancer")}
    for scale in (192, 128):
        configs = adapt.stage_configs(tmp_path, {**settings, "caption_scale": scale}, data, minutes=20, scale=1.0)
        for stage in ("captioner", "enhancer"):
            cfg, side = configs[stage], template[stage]["data"]["image_size"] / scale
            assert cfg["data"]["image_size"] == scale  # trained at the scale the pipeline captions at
            assert cfg["trainer"]["max_steps"] == round(template[stage]["trainer"]["max_steps"] * side)
        assert configs["captioner"]["model"]["init_args"]["caption_scale"] == scale
        assert (
            configs["segmenter"]["trainer"]["max_steps"]
            == yaml.safe_load((adapt.CONFIGS / "segmenter.yaml").read_text())["trainer"]["max_steps"]
        )


def test_cli_rejects_a_caption_scale_the_pipeline_does_not_encode(tmp_path, capsys):
    data = make_folder(tmp_path / "d", ["sky"], 2)
    with pytest.raises(SystemExit):
        adapt.main(["--from", "demo", "--data", str(data), "--out", str(tmp_path / "o"), "--caption-scale", "160"])
    assert "--caption-scale" in capsys.readouterr().err


def test_run_stage_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(adapt, "run_train", lambda *a, **k: calls.append((a, k)))
    adapt.run_stage(tmp_path, "segmenter", resume=True, threads=1)  # nothing to resume: a fresh run
    assert calls[-1][0][3] == [] and calls[-1][1]["fresh"] is True
    ckpt = adapt.last_checkpoint(tmp_path, "segmenter")
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    adapt.run_stage(tmp_path, "segmenter", resume=True, threads=1)
    assert calls[-1][0][3] == [f"--ckpt_path={ckpt}"] and calls[-1][1]["fresh"] is False
    adapt.run_stage(tmp_path, "segmenter", resume=False, threads=1)  # without --resume: start again
    assert calls[-1][1]["fresh"] is True
    assert calls[-1][0][0] == tmp_path / "configs" / "segmenter.yaml"


def test_adapt_markdown_table():
    fig = {"mIoU": 50.0, "per_class": {"sky": 90.0, "zorblat": None}}
    after = {"mIoU": 70.0, "per_class": {"sky": 91.0, "zorblat": 45.5}}
    result = {
        "from": "demo",
        "data": "d",
        "new_classes": ["zorblat"],
        "new_words": ["zorblat"],
        "figures": {"val": {"before": fig, "after": after}},
        "seconds": {"captioner": 120.0},
    }
    text = adapt.adapt_markdown(result)
    assert "| class | val before | val after |" in text
    assert "| zorblat (new) | - | 45.5 |" in text and "| sky | 90.0 | 91.0 |" in text
    assert "| **mIoU** | **50.0** | **70.0** |" in text and "| captioner | 2.0 |" in text


def test_cli_rejects_a_folder_without_classes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        adapt.main(["--from", "demo", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "not a folder dataset" in capsys.readouterr().err


@pytest.mark.slow
def test_adapt_smoke_run_and_resume(tmp_path):
    from autoseg.config import load_config
    from autoseg.data.shapes import ShapesConfig, write_dataset

    config = ShapesConfig(things=("circle", "square", "triangle", "star", "cross", "heart", "ring"))
    data = write_dataset(tmp_path / "new", 40, seed=5, config=config, progress=False)
    (data / "classes.txt").write_text((data / "classes.txt").read_text().replace("heart", "blorvik"))
    val = write_dataset(tmp_path / "val", 4, seed=6, config=config, progress=False)
    (val / "classes.txt").write_text((val / "classes.txt").read_text().replace("heart", "blorvik"))
    out = tmp_path / "run"
    argv = ["--from", "demo", "--data", str(data), "--val", str(val), "--out", str(out), "--scale", "0.004"]
    assert adapt.main([*argv, "--minutes", "2"]) == 0
    result = json.loads((out / "adapt.json").read_text())
    assert "blorvik" in result["new_words"] and "blorvik" in result["new_classes"]
    assert set(result["figures"]["val"]) == {"before", "after"}
    assert {"captioner", "segmenter", "enhancer"} <= set(result["done"])
    for stage in ("captioner", "segmenter", "enhancer"):
        assert (out / "configs" / f"{stage}.yaml").is_file()
    pipeline = load_config(out / "pipeline.yaml")
    assert pipeline.blip == str(out / "models" / "blip") and pipeline.caption.mask_padding is True
    assert pipeline.caption_scale == 192 == result["caption_scale"]  # the demo's finest scale
    assert BlipCaptioner.from_pretrained(pipeline.blip).processor.tokenizer.tokenize("blorvik") == ["blorvik"]
    assert "blorvik (new)" in (out / "adapt.md").read_text()
    seconds = dict(result["seconds"])
    assert adapt.main([*argv, "--minutes", "2", "--resume"]) == 0  # everything done: only assemble/evaluate again
    again = json.loads((out / "adapt.json").read_text())
    assert again["seconds"]["captioner"] == seconds["captioner"]
