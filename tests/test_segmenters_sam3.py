"""SAM 3 backend on tiny random models saved with save_pretrained and loaded through build_segmenter."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Sam3LiteTextModel, Sam3Model

from autoseg.models import scratch
from autoseg.models.segmenters import Sam3Segmenter, SegmenterConfig, build_segmenter, labels_from_logits
from autoseg.utils.settings import from_dict

WORDS = ["dog", "cat", "sky", "grass", "tree"]


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    torch.manual_seed(0)
    return scratch.save(*scratch.make_sam3(words=WORDS), tmp_path_factory.mktemp("tiny_sam3"))


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    torch.manual_seed(1)
    return scratch.save(*scratch.make_sam3(words=WORDS, lite_text=True), tmp_path_factory.mktemp("tiny_sam3_lite"))


def load(source, **kwargs) -> Sam3Segmenter:
    return build_segmenter(from_dict(SegmenterConfig, {"name": "sam3", "source": str(source), **kwargs}))


def stock(seg: Sam3Segmenter, image: Image.Image, name: str):
    """Sam3Processor + Sam3Model.forward on one (image, name), as the transformers docs use them."""
    inputs = seg.processor(images=[image], text=[name], return_tensors="pt")
    with torch.inference_mode():
        return seg.model(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )


@pytest.mark.parametrize("which", ["sam3", "lite"])
def test_semantic_logits_equal_the_stock_forward(which, sam3_dir, lite_dir):
    seg = load(sam3_dir if which == "sam3" else lite_dir)
    assert isinstance(seg.model, Sam3Model if which == "sam3" else Sam3LiteTextModel)
    image = random_images([(40, 52)])[0]
    with torch.inference_mode():
        ours = seg.logits(seg.preprocess([image]), ["dog", "sky"])  # 1 x 2 x h x w
    assert ours.shape == (1, 2, 32, 32)  # 4 x the 8 x 8 ViT grid of a 64 px input
    for c, name in enumerate(["dog", "sky"]):
        torch.testing.assert_close(ours[0, c], stock(seg, image, name).semantic_seg[0, 0], rtol=1e-4, atol=1e-4)


def test_semantic_label_maps_are_the_argmax_of_upsampled_logits(sam3_dir):
    seg = load(sam3_dir, class_chunk=2)
    images = random_images([(40, 52), (64, 30)], seed=2)
    vocabs = [["dog", "cat", "sky"], ["grass"]]
    maps = seg.segment(images, vocabs)
    assert [m.shape for m in maps] == [(40, 52), (64, 30)]
    assert (maps[1] == 1).all()  # one name: every pixel
    with torch.inference_mode():
        logits = torch.cat([stock(seg, images[0], n).semantic_seg[0] for n in vocabs[0]])  # 3 x h x w
    assert np.array_equal(maps[0], labels_from_logits(logits, (40, 52)))
    assert set(np.unique(maps[0])) <= {1, 2, 3}


def expected_instance_map(seg: Sam3Segmenter, image: Image.Image, names, threshold: float) -> np.ndarray:
    """Naively, from the processor's own post-processing: each pixel takes the best-scoring instance covering it."""
    size = (image.height, image.width)
    best, label = np.full(size, -np.inf), np.zeros(size, np.int32)
    for c, name in enumerate(names):
        out = stock(seg, image, name)
        (res,) = seg.processor.post_process_instance_segmentation(
            out, threshold=threshold, mask_threshold=0.5, target_sizes=[size]
        )
        for mask, score in zip(res["masks"].numpy().astype(bool), res["scores"].tolist(), strict=True):
            win = mask & (score > best)
            best[win], label[win] = score, c + 1
    return label


def test_instances_match_the_processors_post_processing(sam3_dir):
    seg = load(sam3_dir, mode="instances", score_threshold=0.2, pair_chunk=2)
    images = random_images([(40, 52), (33, 70)], seed=3)
    vocabs = [["dog", "cat", "sky"], ["tree", "dog"]]
    maps = seg.segment(images, vocabs)
    for image, names, got in zip(images, vocabs, maps, strict=True):
        expected = expected_instance_map(seg, image, names, 0.2)
        assert 0 < (expected > 0).sum() < expected.size  # some pixels claimed, some not: the test means something
        assert (got == expected).mean() > 0.999  # equal up to pixels on a mask's 0.5 boundary
    none = load(sam3_dir, mode="instances", score_threshold=1.0).segment(images, vocabs)
    assert all((m == 0).all() for m in none)  # no instance scores above 1: nothing claimed


@pytest.mark.parametrize("mode", ["semantic", "instances"])
def test_each_image_is_encoded_once_whatever_the_vocabulary_size(sam3_dir, mode):
    seg = load(sam3_dir, mode=mode, pair_chunk=3)
    encoded, texts = [], []
    vision = seg.model.vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    text = seg.model.text_encoder.register_forward_hook(
        lambda m, args, kw, out: texts.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        seg.segment(random_images([(30, 40), (20, 20), (50, 30)]), [WORDS, [], ["dog"]])
        seg.segment(random_images([(30, 40)]), [WORDS[:1]])
    finally:
        vision.remove()
        text.remove()
    assert encoded == [2, 1]  # one vision forward per batch, each image with names once (5 names or 1)
    assert texts == [5]  # every name once; then cached


@pytest.mark.parametrize("mode", ["semantic", "instances"])
def test_batched_equals_one_image_at_a_time_and_is_deterministic(sam3_dir, mode):
    seg = load(sam3_dir, mode=mode, score_threshold=0.2, pair_chunk=2)
    images = random_images([(40, 52), (33, 70), (64, 64)], seed=4)
    vocabs = [["dog", "cat"], [], ["sky", "grass", "tree"]]
    first = seg.segment(images, vocabs)
    again = load(sam3_dir, mode=mode, score_threshold=0.2, pair_chunk=5).segment(images, vocabs)
    for b, (image, names) in enumerate(zip(images, vocabs, strict=True)):
        alone = seg.segment([image], [names])[0]
        assert np.array_equal(first[b], alone) and np.array_equal(first[b], again[b])
    assert (first[1] == 0).all() and first[1].shape == (33, 70)


@pytest.mark.parametrize("mode", ["semantic", "instances"])
def test_empty_vocabularies_run_nothing(sam3_dir, mode):
    seg = load(sam3_dir, mode=mode)
    calls = []
    hook = seg.model.register_forward_pre_hook(lambda *a: calls.append(1))
    vision = seg.model.vision_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        maps = seg.segment(random_images([(10, 12), (7, 9)]), [[], []])
    finally:
        hook.remove()
        vision.remove()
    assert [m.shape for m in maps] == [(10, 12), (7, 9)] and all((m == 0).all() for m in maps) and not calls


def test_a_missing_model_fails_at_once_with_the_offline_message(tmp_path):
    from autoseg.models.loading import ModelLoadError

    offline = r"(?s)SAM 3 segmenter: could not load 'facebook/sam3'.*hf download facebook/sam3"
    with pytest.raises(ModelLoadError, match=offline):
        load("facebook/sam3")
    with pytest.raises(ModelLoadError, match="SAM 3 segmenter: no such directory"):
        load(tmp_path / "nope" / "sam3")
