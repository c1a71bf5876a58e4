"""Shared test setup: no network, tiny random models saved to disk and loaded through the user-facing loaders."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported: tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads and lose a lot when the cores are shared (measured 25x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same torch seed, so its result does not depend on which tests ran before it."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory):
    """A tiny random BLIP captioner (+ processor) saved with save_pretrained."""
    from autoseg.models import scratch

    model, processor = scratch.make_blip(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, patch_size=8)
    return scratch.save(model, processor, tmp_path_factory.mktemp("tiny_blip"))


@pytest.fixture(scope="session")
def tiny_clipseg_dir(tmp_path_factory):
    """A tiny random CLIPSeg (+ processor) saved with save_pretrained."""
    from autoseg.models import scratch

    model, processor = scratch.make_clipseg(words=["dog", "cat", "grass", "sky"])
    return scratch.save(model, processor, tmp_path_factory.mktemp("tiny_clipseg"))


@pytest.fixture(scope="module")
def batch():
    """A collated batch of two 64 px ShapesWorld samples (image, mask, name), as the data module yields them."""
    from autoseg.data.shapes import ShapesConfig, generate_sample
    from autoseg.data.transforms import SegmentationTransform, collate

    config, transform = ShapesConfig(size=64), SegmentationTransform(64)
    items = []
    for i in range(2):
        image, mask, _ = generate_sample(0, i, config)
        items.append(transform({"image": image, "mask": mask, "name": str(i)}))
    return collate(items)
