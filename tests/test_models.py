"""BLIP encoder/captioner and CLIPSeg segmenter, on tiny random models loaded through the user-facing loaders."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.models.blip import BlipCaptioner, CaptionConfig
from autoseg.models.loading import ModelLoadError
from autoseg.models.segmenters import CLIPSegSegmenter, SegmenterConfig, build_segmenter


@pytest.fixture(scope="module")
def captioner(tiny_blip_dir):
    return BlipCaptioner.from_pretrained(str(tiny_blip_dir))


@pytest.fixture(scope="module")
def segmenter(tiny_clipseg_dir):
    return CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir), image_size=64)


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_blip_is_in_eval_mode(captioner):
    assert not captioner.model.training
    assert not any(m.training for m in captioner.model.modules())


def test_preprocess_normalises_with_the_processors_mean_and_std(captioner):
    flat = Image.new("RGB", (40, 30), (255, 0, 128))
    x = captioner.preprocess([flat], 64)
    assert x.shape == (1, 3, 64, 64)
    ip = captioner.processor.image_processor
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), ip.image_mean, ip.image_std, strict=True)]
    assert torch.allclose(x[0].mean((1, 2)), torch.tensor(expected), atol=1e-3)


def test_encode_splits_cls_from_all_patches(captioner):
    images = random_images([(50, 70), (90, 40)])
    with torch.inference_mode():
        tokens = captioner.encode(images, (64, 96))
        # independent route: transformers' own vision model on the same pixels
        ref = captioner.model.vision_model(captioner.preprocess(images, 96), interpolate_pos_encoding=True)
    assert [t.grid for t in tokens] == [(8, 8), (12, 12)]
    t = tokens[1]
    assert t.patches.shape == (2, 144, 32) and t.cls.shape == (2, 32)
    assert torch.allclose(t.cls, ref.last_hidden_state[:, 0], atol=1e-5)
    assert torch.allclose(t.patches, ref.last_hidden_state[:, 1:], atol=1e-5)  # the last patch is kept


def test_position_embeddings_are_not_modified(captioner):
    before = captioner.model.vision_model.embeddings.position_embedding.detach().clone()
    with torch.inference_mode():
        captioner.encode(random_images([(32, 32)]), (64, 96, 128))
    after = captioner.model.vision_model.embeddings.position_embedding
    assert after.shape == before.shape and torch.equal(after, before)


def test_scale_must_match_patch_size(captioner):
    with pytest.raises(ValueError, match="multiple of BLIP's patch size"):
        captioner.preprocess(random_images([(32, 32)]), 60)


@pytest.mark.parametrize("mode", ["concat", "global", "local", "cls"])
def test_cluster_states_per_mode(captioner, mode):
    with torch.inference_mode():
        tokens = captioner.encode(random_images([(64, 64)]), (64,))[0]
        cmap = torch.zeros(8, 8, dtype=torch.long)
        cmap[:, 5:] = 1  # cluster 0: 40 patches, cluster 1: 24 patches
        states = captioner.cluster_states(tokens, 0, cmap, mode)
    expected = {"global": [41, 25], "local": [41, 25], "concat": [81, 49], "cls": [1, 1]}[mode]
    assert [s.shape[0] for s in states] == expected
    if mode == "global":  # the global states are the full-image tokens of the cluster's patches
        idx = (cmap.flatten() == 1).nonzero()[:, 0]
        assert torch.equal(states[1][1:], tokens.patches[0][idx])


def test_captions_are_seeded_and_sampled(captioner):
    with torch.inference_mode():
        tokens = captioner.encode(random_images([(64, 64)]), (64,))[0]
        cmap = (torch.arange(64).reshape(8, 8) % 8 >= 4).long()
        states = captioner.cluster_states(tokens, 0, cmap, "global")
        cfg = CaptionConfig(n_passes=3, max_new_tokens=6, min_new_tokens=2)
        a = captioner.caption(states, cfg, seed=5)
        b = captioner.caption(states, cfg, seed=5)
        c = captioner.caption(states, cfg, seed=6)
        greedy = captioner.caption(states, CaptionConfig(sample=False, max_new_tokens=6), seed=0)
    assert a == b and a != c
    assert [len(x) for x in a] == [3, 3]
    assert [len(x) for x in greedy] == [1, 1]
    assert all(cap and not cap.startswith("a picture of") for caps in a for cap in caps)


def test_prompt_ids_start_with_dec_and_drop_sep(captioner):
    ids = captioner.prompt_ids("a picture of").tolist()
    tok = captioner.processor.tokenizer
    assert ids[0] == captioner.model.config.text_config.bos_token_id == tok.convert_tokens_to_ids("[DEC]")
    assert tok.convert_ids_to_tokens(ids[1:]) == ["a", "picture", "of"]


def test_clipseg_forward_matches_the_stock_forward(segmenter):
    images = random_images([(64, 64)])
    with torch.inference_mode():
        pv = segmenter.preprocess(images)
        ours = segmenter.logits(pv, ["dog", "cat"])  # 1 x 2 x H x W
        for c, name in enumerate(["dog", "cat"]):
            prompts = [t.format(name) for t in segmenter.templates]
            tok = segmenter.processor.tokenizer(prompts, padding=True, return_tensors="pt")
            emb = segmenter.model.clip.get_text_features(**tok).pooler_output.mean(0, keepdim=True)
            stock = segmenter.model(pixel_values=pv, conditional_embeddings=emb).logits
            assert torch.allclose(ours[0, c], stock.reshape(ours.shape[-2:]), rtol=1e-4, atol=1e-3)


def test_segment_returns_label_maps_at_original_size(segmenter):
    images = random_images([(50, 70), (33, 81), (20, 20)])
    maps = segmenter.segment(images, [["dog", "cat", "sky"], [], ["grass"]])
    assert [m.shape for m in maps] == [(50, 70), (33, 81), (20, 20)]
    assert set(np.unique(maps[0])) <= {1, 2, 3}  # threshold 0: every pixel gets a name
    assert (maps[1] == 0).all()  # empty vocabulary: all unlabelled
    assert (maps[2] == 1).all()


def test_segment_label_is_argmax_of_upsampled_logits(segmenter):
    images = random_images([(40, 56)], seed=3)
    names = ["dog", "cat", "grass"]
    with torch.inference_mode():
        logits = segmenter.logits(segmenter.preprocess(images), names)[0]
        up = torch.nn.functional.interpolate(logits[None], size=(40, 56), mode="bilinear")[0]
    segmenter.class_chunk = 2  # chunked upsampling must not change the answer
    got = segmenter.segment(images, [names])[0]
    assert np.array_equal(got, up.argmax(0).numpy() + 1)


def test_threshold_leaves_low_scores_unlabelled(tiny_clipseg_dir):
    seg = build_segmenter(SegmenterConfig(source=str(tiny_clipseg_dir)).with_options(image_size=64))
    images, names = random_images([(30, 30)], seed=4), ["dog", "cat"]
    with torch.inference_mode():
        logits = seg.logits(seg.preprocess(images), names)[0]
        best = torch.nn.functional.interpolate(logits[None], size=(30, 30), mode="bilinear")[0].max(0).values
    seg.threshold = float(torch.sigmoid(best).median())  # about half the pixels fall below
    got = seg.segment(images, [names])[0]
    expected_unlabelled = (torch.sigmoid(best) < seg.threshold).numpy()
    assert 0 < expected_unlabelled.sum() < expected_unlabelled.size
    assert np.array_equal(got == 0, expected_unlabelled)


def test_text_embeddings_average_templates_and_are_cached(segmenter):
    with torch.inference_mode():
        emb = segmenter.text_embeddings(["dog", "cat", "dog"])
        tok = segmenter.processor.tokenizer(
            [t.format("cat") for t in segmenter.templates], padding=True, return_tensors="pt"
        )
        cat = segmenter.model.clip.get_text_features(**tok).pooler_output.mean(0)
    assert emb.shape[0] == 3 and torch.equal(emb[0], emb[2])
    assert torch.allclose(emb[1], cat, atol=1e-5)
    assert "dog" in segmenter._text_cache and "cat" in segmenter._text_cache


def test_unknown_segmenter_lists_options():
    with pytest.raises(ValueError, match=r"available: \['clipseg', 'sam3', 'grounded_sam'\]"):
        build_segmenter(SegmenterConfig(name="nope"))


def test_bad_templates_rejected(tiny_clipseg_dir):
    with pytest.raises(ValueError, match="template"):
        CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir), templates=("a photo",))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory.*--blip"):
        BlipCaptioner.from_pretrained(str(tmp_path / "missing" / "blip"))


def test_directory_without_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the directory"):
        CLIPSegSegmenter.from_pretrained(str(tmp_path))


def test_unavailable_hub_id_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        BlipCaptioner.from_pretrained("Salesforce/blip-image-captioning-large")
    msg = str(err.value)
    assert "Salesforce/blip-image-captioning-large" in msg and "--blip DIR" in msg and "hf download" in msg
    assert time.monotonic() - start < 20  # not a retry loop (generous bound; it takes well under a second)


def test_word_vocabulary_blip_saves_loads_and_captions_in_whole_words(tmp_path):
    from autoseg.models.scratch import make_blip

    words = ["a", "picture", "of", "red", "star", "on", "the", "grass"]
    model, processor = make_blip(patch_size=8, image_size=32, words=words)
    tok = processor.tokenizer
    assert len(tok) == model.config.text_config.vocab_size < 200  # BERT's vocabulary has 30,524 with BLIP's tokens
    assert tok.tokenize("A red star on the grass") == ["a", "red", "star", "on", "the", "grass"]
    assert tok.tokenize("grasses") == ["grass", "##e", "##s"]  # unknown words become pieces, not [UNK]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = BlipCaptioner.from_pretrained(str(tmp_path))
    assert loaded.processor.tokenizer.tokenize("a red star") == ["a", "red", "star"]
    dec = loaded.processor.tokenizer.convert_tokens_to_ids("[DEC]")
    assert loaded.model.config.text_config.bos_token_id == dec and loaded.prompt_ids("a picture of")[0] == dec
    ids = loaded.processor.tokenizer("a red star on the grass").input_ids
    assert loaded.processor.tokenizer.decode(ids, skip_special_tokens=True) == "a red star on the grass"
    states = [loaded.encode([Image.new("RGB", (32, 32), "red")], [32])[0].patches[0]]
    caption = loaded.caption(states, CaptionConfig(sample=False, min_new_tokens=2, max_new_tokens=2))[0][0]
    assert isinstance(caption, str) and caption  # random weights: any two tokens
    with pytest.raises(TypeError, match=r"\[True\] are not strings .*'on'"):
        make_blip(words=["a", True])


# ------------------------------------------------------------------ weights that do not fit, or are pickles


class RunsCode:
    """Unpickling this creates ``marker``: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def blip_copy(src, dst):
    """A copy of a saved BLIP folder and its weights (a dict of tensors)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    return dst, load_file(dst / "model.safetensors")


def test_blip_folder_with_wrong_shape_weights_names_the_file_and_the_tensor(tiny_blip_dir, tmp_path):
    from safetensors.torch import save_file

    folder, weights = blip_copy(tiny_blip_dir, tmp_path / "blip")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    rows, cols = weights[key].shape
    weights[key] = torch.zeros(rows + 3, cols)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        BlipCaptioner.from_pretrained(str(folder))
    msg = str(err.value)
    assert str(folder) in msg and "model.safetensors" in msg and key in msg and "\n" not in msg, msg
    assert f"({rows + 3}, {cols})" in msg and f"({rows}, {cols})" in msg


@pytest.mark.parametrize("hostile", [False, True], ids=["plain", "runs-code"])
def test_pickled_weights_are_refused_without_being_unpickled(tiny_blip_dir, tmp_path, hostile):
    folder, weights = blip_copy(tiny_blip_dir, tmp_path / "blip")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**weights, "x": RunsCode(marker)} if hostile else weights, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        BlipCaptioner.from_pretrained(str(folder))
    msg = str(err.value)
    assert str(folder) in msg and "pytorch_model.bin" in msg and "safetensors" in msg and "\n" not in msg, msg
    assert not marker.exists()


def test_config_naming_pickled_weights_is_refused(tiny_blip_dir, tmp_path):
    import json

    folder, weights = blip_copy(tiny_blip_dir, tmp_path / "blip")
    torch.save(weights, folder / "adapter_model.bin")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ModelLoadError, match=r"config.json.*adapter_model.bin.*safetensors"):
        BlipCaptioner.from_pretrained(str(folder))
