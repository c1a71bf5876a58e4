"""Segmenter package: the shared helpers (hand-computed), CLIPSeg batching == the per-image path, the registry."""

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.config import ConfigError, load_config
from autoseg.models.segmenters import (
    BACKENDS,
    CLIPSegSegmenter,
    SegmenterConfig,
    build_segmenter,
    labels_from_logits,
    merge_instances,
    segmenter_source,
)
from autoseg.models.segmenters import clipseg as clipseg_module
from autoseg.models.segmenters.base import LRUCache, merge_best, pair_chunks
from autoseg.models.segmenters.clip_text import template_text_features


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# ------------------------------------------------------------------------------------------- the instance merge
def test_merge_instances_matches_a_hand_computed_map():
    """Three overlapping 4 x 5 masks (logit > 0 = covered): the best score covering a pixel names it."""
    a = [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]  # label 2, score 0.6
    b = [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]]  # label 1, score 0.9
    c = [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [1, 0, 0, 0, 0]]  # label 3, score 0.7
    masks = torch.tensor([a, b, c], dtype=torch.float32) * 2 - 1  # covered +1, not covered -1
    expected = np.array(
        [
            [2, 2, 2, 0, 3],
            [2, 1, 1, 1, 3],  # b (0.9) beats a (0.6) and c (0.7) where they overlap
            [0, 1, 1, 1, 3],
            [3, 0, 0, 0, 0],  # unclaimed pixels stay 0
        ]
    )
    got = merge_instances(masks, torch.tensor([0.6, 0.9, 0.7]), torch.tensor([2, 1, 3]), (4, 5))
    assert got.dtype == np.int32 and np.array_equal(got, expected)
    for chunk in (1, 2):  # chunking the masks changes nothing
        assert np.array_equal(
            merge_instances(masks, torch.tensor([0.6, 0.9, 0.7]), torch.tensor([2, 1, 3]), (4, 5), chunk), expected
        )


def test_merge_ties_go_to_the_earlier_instance_and_nothing_gives_zeros():
    masks = torch.ones(2, 2, 2)
    assert (merge_instances(masks, torch.tensor([0.5, 0.5]), torch.tensor([4, 7]), (2, 2)) == 4).all()
    assert (merge_instances(masks, torch.tensor([0.5, 0.5]), torch.tensor([4, 7]), (2, 2), chunk=1) == 4).all()
    assert (merge_instances(torch.zeros(0, 2, 2), torch.zeros(0), torch.zeros(0), (3, 2)) == 0).all()
    assert merge_best([], (3, 2), max_instances=5).shape == (3, 2)


def test_merge_upsamples_low_resolution_masks_and_keeps_the_best_instances():
    """A 2 x 2 mask covering the left column covers the left half of a 4 x 6 map; max_instances keeps the best."""
    left = torch.tensor([[[3.0, -3.0], [3.0, -3.0]]])
    everywhere = torch.full((1, 2, 2), 3.0)
    got = merge_instances(left, torch.tensor([0.9]), torch.tensor([5]), (4, 6))
    assert np.array_equal(got, np.array([[5, 5, 5, 0, 0, 0]] * 4))
    parts = [(left, torch.tensor([0.9]), torch.tensor([5])), (everywhere, torch.tensor([0.8]), torch.tensor([2]))]
    assert np.array_equal(merge_best(parts, (4, 6), max_instances=2), np.array([[5, 5, 5, 2, 2, 2]] * 4))
    assert np.array_equal(merge_best(parts, (4, 6), max_instances=1), got)  # only the best one


def test_labels_from_logits_is_the_thresholded_argmax():
    logits = torch.tensor([[[2.0, -1.0], [0.0, -3.0]], [[1.0, 1.0], [0.5, -2.0]]])  # C=2 x 2 x 2
    assert np.array_equal(labels_from_logits(logits, (2, 2)), [[1, 2], [2, 2]])
    # best probabilities: sigmoid(2)=.88, sigmoid(1)=.73, sigmoid(.5)=.62, sigmoid(-2)=.12
    assert np.array_equal(labels_from_logits(logits, (2, 2), threshold=0.7, class_chunk=1), [[1, 2], [0, 0]])


def test_pair_chunks_are_image_major_with_labels_and_bounded():
    vocabs = [["cat", "dog"], [], ["dog", "sky", "cat"]]
    names = ["cat", "dog", "sky"]
    chunks = list(pair_chunks(vocabs, [0, 2], names, chunk=2))
    assert [len(i) for i, _, _ in chunks] == [2, 2, 1]
    image, name, label = (torch.cat(c).tolist() for c in zip(*chunks, strict=True))
    assert image == [0, 0, 1, 1, 1] and name == [0, 1, 1, 2, 0] and label == [1, 2, 1, 2, 3]


def test_lru_cache_is_bounded_and_drops_the_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert len(cache) == 2 and "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    assert cache.get("missing") is None


# ------------------------------------------------------------------------------------------- CLIPSeg batching
@pytest.fixture(scope="module")
def clipseg(tiny_clipseg_dir):
    return CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir), image_size=64, pair_chunk=3)


def test_clipseg_batched_label_maps_equal_the_per_image_path_exactly(clipseg):
    """Different sizes and vocabularies (one empty): batched == one image at a time == argmax of per-image logits."""
    images = random_images([(50, 70), (33, 81), (64, 64), (20, 45)], seed=1)
    vocabs = [["dog", "cat", "sky"], [], ["grass", "dog"], ["sky", "tree", "cat", "grass", "dog"]]
    batched = clipseg.segment(images, vocabs)
    for image, names, got in zip(images, vocabs, batched, strict=True):
        alone = clipseg.segment([image], [names])[0]
        assert got.shape == (image.height, image.width) and np.array_equal(got, alone)
        if names:
            with torch.inference_mode():
                logits = clipseg.logits(clipseg.preprocess([image]), names)[0]  # the old per-image path
            assert np.array_equal(got, labels_from_logits(logits, (image.height, image.width)))
        else:
            assert (got == 0).all()


def test_clipseg_encodes_each_batch_once_and_each_name_once(clipseg, monkeypatch):
    calls = {"vision": 0, "text": []}
    vision = clipseg.model.clip.vision_model.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
    )

    def counted(text_model, projection, tokenizer, templates, names):
        calls["text"].append(list(names))
        return template_text_features(text_model, projection, tokenizer, templates, names)

    monkeypatch.setattr(clipseg_module, "template_text_features", counted)
    clipseg._text_cache.clear()
    try:
        clipseg.segment(random_images([(30, 30)] * 3), [["dog", "cat"], ["cat", "sky", "tree", "grass"], ["dog"]])
    finally:
        vision.remove()
    assert calls["vision"] == 1  # all three images in one vision forward
    assert calls["text"] == [["dog", "cat", "sky", "tree", "grass"]]  # five unique names, once each
    with torch.inference_mode():
        clipseg.text_embeddings(["dog"])  # cached now
    assert len(clipseg._text_cache) == 5


def test_clipseg_text_cache_is_bounded(tiny_clipseg_dir):
    seg = CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir), image_size=64, text_cache_size=2)
    with torch.inference_mode():
        emb = seg.text_embeddings(["dog", "cat", "sky", "dog"])
    assert emb.shape[0] == 4 and torch.equal(emb[0], emb[3]) and len(seg._text_cache) == 2


def test_clipseg_all_empty_vocabularies_give_unlabelled_maps_without_running_the_model(clipseg):
    calls = []
    hook = clipseg.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        maps = clipseg.segment(random_images([(10, 12), (7, 9)]), [[], []])
    finally:
        hook.remove()
    assert [m.shape for m in maps] == [(10, 12), (7, 9)] and all((m == 0).all() for m in maps) and not calls
    with pytest.raises(ValueError, match="2 images but 1 vocabularies"):
        clipseg.segment(random_images([(10, 12), (7, 9)]), [[]])


# ------------------------------------------------------------------------------------------- registry and config
def test_every_backend_has_a_default_model_and_unknown_names_list_them():
    assert list(BACKENDS) == ["clipseg", "sam3", "grounded_sam"] and all(b.default_source for b in BACKENDS.values())
    assert segmenter_source(SegmenterConfig(name="sam3")) == "facebook/sam3"
    assert segmenter_source(SegmenterConfig(name="sam3", source="my/sam3")) == "my/sam3"
    with pytest.raises(ValueError, match=r"unknown segmenter 'sam9'; available: \['clipseg', 'sam3', 'grounded_sam'\]"):
        build_segmenter(SegmenterConfig(name="sam9"))
    with pytest.raises(ValueError, match=r"segmenter 'clipseg' has no mode 'instances'; available: \['semantic'\]"):
        build_segmenter(SegmenterConfig(mode="instances"))


@pytest.mark.parametrize(
    ("segmenter", "message"),
    [
        ({"name": "sam9"}, r"segmenter.name: expected one of \['clipseg', 'sam3', 'grounded_sam'\], got 'sam9'"),
        (
            {"name": "grounded_sam", "mode": "semantic"},
            r"segmenter.mode: expected one of \['instances'\] for segmenter",
        ),
        ({"name": "sam3", "mode": "panoptic"}, r"segmenter.mode: expected one of \['semantic', 'instances'\]"),
        ({"name": "sam3", "score_threshold": 1.5}, r"segmenter.score_threshold: expected a number in \[0, 1\]"),
        ({"name": "grounded_sam", "box_threshold": -0.1}, r"segmenter.box_threshold: expected a number in \[0, 1\]"),
        (
            {"name": "grounded_sam", "text_threshold": "high"},
            r"segmenter.text_threshold: expected a number in \[0, 1\], got 'high'",
        ),
        ({"box_threshold": 0.3}, r"segmenter.box_threshold: unknown key; allowed in segmenter: \[.*'templates'"),
        ({"max_instances": 0}, r"segmenter.max_instances: expected an integer >= 1, got 0"),
        ({"pair_chunk": 0}, r"segmenter.pair_chunk: expected an integer >= 1, got 0"),
        (
            {"name": "grounded_sam", "sam_source": ""},
            r"segmenter.sam_source: expected a string \(not empty\) or null, got ''",
        ),
        ({"source": 3}, r"segmenter.source: expected null \(the backend's default model\) or a string"),
    ],
)
def test_bad_segmenter_settings_name_the_key(segmenter, message):
    with pytest.raises(ConfigError, match=rf"^overrides: {message}"):
        load_config(None, {"segmenter": segmenter})


@pytest.mark.parametrize("name", ["sam3", "grounded_sam"])
def test_shipped_presets_choose_their_backend(name):
    config = load_config(f"configs/pipeline/{name}.yaml")
    assert config.segmenter.name == name and segmenter_source(config.segmenter) == BACKENDS[name].default_source


@pytest.mark.parametrize("eos_is_two", [False, True])
def test_template_text_features_equal_clips_own_forward_on_the_full_prompts(tiny_clipseg_dir, eos_is_two):
    """Prefixes run once and prompts from the name on give CLIP's features; a template whose prefix tokens the
    tokenizer merges with the name ("a{}": no space) runs in full; names of several words and unknown words too."""
    seg = CLIPSegSegmenter.from_pretrained(str(tiny_clipseg_dir), image_size=64)
    text_model, tok = seg.model.clip.text_model, seg.processor.tokenizer
    if eos_is_two:  # transformers' legacy pooling (the highest id) for configs with eos_token_id 2
        text_model.eos_token_id = 2
    templates = ["a photo of a {}.", "there is a {} in the scene.", "{}", "a{} here", "this is a {}"]
    names = ["dog", "grass", "zebra crossing", "x", "tree dog cat"]
    with torch.inference_mode():
        got = template_text_features(text_model, seg.model.clip.text_projection, tok, templates, names)
        for c, name in enumerate(names):
            prompts = seg.tokenize([t.format(name) for t in templates])
            stock = seg.model.clip.get_text_features(**prompts).pooler_output  # T x E
            torch.testing.assert_close(got[c], stock, rtol=1e-5, atol=1e-5)


def test_text_features_pool_where_transformers_does_when_the_end_token_never_occurs(tiny_clipseg_dir, tmp_path):
    """A config whose ``eos_token_id`` the tokenizer never emits: transformers pools every prompt at position 0
    (``(ids == eos).argmax()`` of an all-False row); the cached-prefix features and the segmenter's text embeddings
    equal ``get_text_features`` on the full prompts, where they used to fail on ``ids.index(eos)``."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(str(tiny_clipseg_dir))
    processor = CLIPSegProcessor.from_pretrained(str(tiny_clipseg_dir))
    never = processor.tokenizer.convert_tokens_to_ids("§")  # a byte token no ASCII text tokenises to
    model.config.text_config.eos_token_id = never
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    templates, names = ["a photo of a {}.", "{}", "there is a {} in the scene."], ["dog", "zebra crossing", "x"]
    seg = CLIPSegSegmenter.from_pretrained(str(tmp_path), image_size=64, templates=templates)
    text_model, projection = seg.model.clip.text_model, seg.model.clip.text_projection
    assert text_model.eos_token_id == never != processor.tokenizer.eos_token_id
    with torch.inference_mode():
        got = template_text_features(text_model, projection, seg.processor.tokenizer, templates, names)
        embeddings = seg.text_embeddings(names)
        for c, name in enumerate(names):
            prompts = seg.tokenize([t.format(name) for t in templates])
            assert not (prompts["input_ids"] == never).any()
            stock = seg.model.clip.get_text_features(**prompts).pooler_output  # T x E, pooled at position 0
            torch.testing.assert_close(got[c], stock, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(embeddings[c], stock.mean(0), rtol=1e-5, atol=1e-5)
