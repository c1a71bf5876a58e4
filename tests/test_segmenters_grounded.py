"""Grounding DINO + SAM backend on tiny random models saved with save_pretrained and loaded through build_segmenter."""

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.models import scratch
from autoseg.models.segmenters import GroundedSamSegmenter, SegmenterConfig, build_segmenter
from autoseg.models.segmenters.grounded_sam import grounded_sources, name_tokens, prompt_groups
from autoseg.utils.settings import from_dict


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def gsam_dir(tmp_path_factory):
    torch.manual_seed(0)
    return scratch.save_grounded_sam(
        scratch.make_grounding_dino(), scratch.make_sam(), tmp_path_factory.mktemp("tiny_grounded_sam")
    )


def load(source, **kwargs) -> GroundedSamSegmenter:
    kwargs = {"box_threshold": 0.2, "text_threshold": 0.1, **kwargs}
    return build_segmenter(from_dict(SegmenterConfig, {"name": "grounded_sam", "source": str(source), **kwargs}))


def test_sources_of_a_combined_folder_and_of_an_id(gsam_dir, tmp_path):
    assert grounded_sources(str(gsam_dir)) == (str(gsam_dir / "detector"), str(gsam_dir / "sam"))
    assert grounded_sources(str(gsam_dir), "my/sam") == (str(gsam_dir / "detector"), "my/sam")
    assert grounded_sources("IDEA-Research/grounding-dino-tiny") == (
        "IDEA-Research/grounding-dino-tiny",
        "facebook/sam-vit-base",
    )


def test_names_are_found_in_the_prompt_by_their_tokens(gsam_dir):
    tok = load(gsam_dir).detector_processor.tokenizer
    prompt = "dog. red car. sky."
    enc = tok([prompt], return_tensors="pt")
    # [CLS] dog . red car . sky . [SEP]
    assert tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())[1:8] == ["dog", ".", "red", "car", ".", "sky", "."]
    assert name_tokens(enc.char_to_token, 0, prompt, ["dog", "red car", "sky"]) == [[1], [3, 4], [6]]
    # each name costs its tokens + 1 for "."; CLS and SEP 2: dog (2) + red car (3) = 7 tokens, sky would make 9
    assert prompt_groups(tok, ["dog", "red car", "sky"], max_tokens=8) == [[0, 1], [2]]
    assert prompt_groups(tok, ["dog", "red car", "sky"], max_tokens=9) == [[0, 1, 2]]


def test_boxes_are_kept_by_both_thresholds_and_named_by_their_best_name():
    seg = GroundedSamSegmenter.__new__(GroundedSamSegmenter)
    seg.box_threshold, seg.text_threshold = 0.5, 0.3
    # 4 queries x 6 tokens; names: "dog" = token 1, "red car" = tokens 3 and 4
    probs = torch.tensor(
        [
            [0.0, 0.9, 0.0, 0.2, 0.2, 0.0],  # dog 0.9: kept as dog, score 0.9
            [0.0, 0.1, 0.0, 0.6, 0.4, 0.0],  # red car mean 0.5 beats dog 0.1; best token 0.6 > 0.5: red car, 0.6
            [0.0, 0.4, 0.0, 0.3, 0.3, 0.0],  # best token 0.4 <= box threshold: dropped
            [0.0, 0.0, 0.0, 0.55, 0.0, 0.0],  # box 0.55 but red car mean 0.275 <= text threshold: dropped
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    xyxy, score, label = seg.keep_boxes(probs, boxes, [[1], [3, 4]], [1, 2], Image.new("RGB", (40, 20)))
    torch.testing.assert_close(xyxy, torch.tensor([[0.0, 0.0, 40.0, 20.0], [0.0, 8.0, 20.0, 12.0]]))
    torch.testing.assert_close(score, torch.tensor([0.9, 0.6]))
    assert label.tolist() == [1, 2]


def test_a_box_is_scored_by_the_tokens_of_the_name_it_is_given():
    """The box threshold and the merge score use the chosen name's own best token, not another name's."""
    seg = GroundedSamSegmenter.__new__(GroundedSamSegmenter)
    seg.box_threshold, seg.text_threshold = 0.5, 0.3
    spans, labels = [[1, 2], [4]], [1, 2]  # name 1 = tokens 1 and 2, name 2 = token 4
    probs = torch.tensor(
        [
            [0.0, 0.9, 0.1, 0.0, 0.6, 0.0],  # means 0.5 vs 0.6: name 2, whose token is 0.6 (name 1 has the 0.9)
            [0.0, 0.7, 0.0, 0.0, 0.4, 0.0],  # means 0.35 vs 0.4: name 2, whose best token 0.4 fails the box threshold
            [0.0, 0.8, 0.6, 0.0, 0.2, 0.0],  # means 0.7 vs 0.2: name 1, best token 0.8
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3)
    _, score, label = seg.keep_boxes(probs, boxes, spans, labels, Image.new("RGB", (10, 10)))
    assert label.tolist() == [2, 1]  # query 1 dropped
    expected = torch.stack([probs[0, [4]].max(), probs[2, [1, 2]].max()])  # each kept box's own name's best token
    torch.testing.assert_close(score, expected)
    torch.testing.assert_close(score, torch.tensor([0.6, 0.8]))


def test_sam_masks_match_the_stock_processor_and_merge_by_score(gsam_dir, monkeypatch):
    """Hand-made detections: SAM's masks and their unpadding agree with SamProcessor + SamModel + post_process_masks."""
    seg = load(gsam_dir)
    image = random_images([(40, 60)], seed=5)[0]
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0], [20.0, 10.0, 58.0, 38.0]])
    scores, labels = torch.tensor([0.4, 0.8]), torch.tensor([2, 1], dtype=torch.int32)
    monkeypatch.setattr(seg, "detect", lambda images, vocabs: [(boxes, scores, labels)])
    got = seg.segment([image], [["dog", "cat"]])[0]

    inputs = seg.sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    with torch.inference_mode():
        out = seg.sam(**inputs, multimask_output=False)
    masks = seg.sam_processor.post_process_masks(
        out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    masks = masks[0][:, 0].numpy()  # 2 x 40 x 60, binary
    expected = np.zeros((40, 60), np.int32)
    expected[masks[0]] = 2
    expected[masks[1]] = 1  # the better-scoring box wins where both cover
    assert 0 < (expected > 0).sum() < expected.size
    assert (got == expected).mean() > 0.999  # equal up to pixels on a mask's boundary


def test_each_image_is_encoded_once_by_sam_and_images_of_one_size_are_detected_together(gsam_dir):
    seg = load(gsam_dir)
    sam_batches, det_batches = [], []
    hooks = [
        seg.sam.vision_encoder.register_forward_hook(lambda m, args, out: sam_batches.append(args[0].shape[0])),
        seg.detector.model.backbone.register_forward_hook(lambda m, args, out: det_batches.append(args[0].shape[0])),
    ]
    try:
        images = random_images([(30, 40), (20, 20), (30, 40), (50, 30)])
        maps = seg.segment(images, [["dog", "cat", "sky", "grass"], [], ["dog"], ["tree", "cat"]])
    finally:
        for h in hooks:
            h.remove()
    assert det_batches == [2, 1]  # the two 30 x 40 images in one Grounding DINO call (unpadded), the 50 x 30 alone
    assert sam_batches == [3], "one SAM encoder call, each image with names once (the tiny detector finds boxes)"
    assert (maps[1] == 0).all() and maps[0].shape == (30, 40) and set(np.unique(maps[0])) <= {0, 1, 2, 3, 4}


def test_batched_equals_one_image_at_a_time_and_is_deterministic(gsam_dir):
    seg = load(gsam_dir, pair_chunk=1)
    images = random_images([(40, 52), (33, 70), (64, 64)], seed=4)
    vocabs = [["dog", "cat"], [], ["sky", "grass", "tree"]]
    first = seg.segment(images, vocabs)
    again = load(gsam_dir, pair_chunk=7).segment(images, vocabs)
    for b, (image, names) in enumerate(zip(images, vocabs, strict=True)):
        alone = seg.segment([image], [names])[0]
        assert np.array_equal(first[b], alone) and np.array_equal(first[b], again[b])
    assert (first[1] == 0).all() and any((m > 0).any() for m in first)


def test_empty_vocabularies_and_no_boxes_give_unlabelled_maps(gsam_dir):
    seg = load(gsam_dir, box_threshold=1.0)
    calls = []
    hook = seg.sam.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        maps = seg.segment(random_images([(10, 12), (7, 9)]), [[], ["dog"]])
    finally:
        hook.remove()
    assert [m.shape for m in maps] == [(10, 12), (7, 9)] and all((m == 0).all() for m in maps) and not calls
