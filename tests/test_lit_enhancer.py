"""EnhancerModule: overfits one batch, keeps BLIP frozen, lean checkpoints, identity baseline of the cluster mIoU."""

import lightning as L
import numpy as np
import pytest
import torch

from autoseg.data.datamodules import SegmentationDataModule, ShapesWorldSpec
from autoseg.data.shapes import ShapesConfig
from autoseg.lit import EnhancerModule
from autoseg.lit.grouping import patch_labels

CLASSES = list(ShapesConfig().classes)
TINY_HEAD = dict(head_width=32, head_depth=1, head_heads=2, head_pos_dim=16)


def supcon_floor(labels: torch.Tensor) -> float:
    """Lower bound of the supervised contrastive loss: mean over anchors of log(number of positives)."""
    flat = labels[labels >= 0]
    positives = torch.stack([(flat == c).sum() - 1 for c in flat]).float()
    return positives[positives > 0].log().mean().item()


def test_head_overfits_one_batch(batch):
    torch.manual_seed(0)
    module = EnhancerModule(blip="scratch:tiny", classes=CLASSES, keep_weight=0.1, max_patches=10_000, **TINY_HEAD)
    optimizer = torch.optim.AdamW(module.enhancer.parameters(), lr=3e-3)
    tokens, grid = module.encode(batch["image"])
    labels = patch_labels(batch["mask"], grid, 255)
    floor = supcon_floor(labels)
    losses = []
    for _ in range(60):
        loss = module.loss(tokens, module.enhancer(tokens, grid), labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # the gap to the loss floor shrinks at least 10x (measured: 2.07 -> 0.09)
    assert losses[-1] - floor < 0.1 * (losses[0] - floor), (losses[0], losses[-1], floor)


def test_blip_is_frozen_in_eval_mode_and_left_out_of_checkpoints(batch):
    module = EnhancerModule(blip="scratch:tiny", classes=CLASSES, **TINY_HEAD).train()
    assert not module.blip.training and module.enhancer.training
    assert all(not p.requires_grad for p in module.blip.parameters())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("enhancer.") for n in trainable)
    optimizer = module.configure_optimizers()["optimizer"]  # timm AdamW over the head only
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.enhancer.parameters()
    )

    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("enhancer.") for k in checkpoint["state_dict"])
    fresh = EnhancerModule(blip="scratch:tiny", classes=CLASSES, **TINY_HEAD)
    fresh.on_load_checkpoint(checkpoint)  # puts the frozen weights back so strict loading works
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = batch["image"][:1]
    torch.testing.assert_close(fresh.encode(x)[0], module.encode(x)[0], rtol=0, atol=0)


def test_untrained_head_scores_exactly_the_identity_baseline(tmp_path):
    dm = SegmentationDataModule(
        shapesworld=ShapesWorldSpec(root=str(tmp_path), n_train=2, n_val=4, size=64),
        image_size=64,
        batch_size=2,
        num_workers=0,
    )
    module = EnhancerModule(blip="scratch:tiny", classes=dm.classes, **TINY_HEAD)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert 0.05 < metrics["val/cluster_mIoU"] <= 1.0
    assert metrics["val/cluster_mIoU"] == metrics["val/cluster_mIoU_identity"]
    assert module.identity_miou == pytest.approx(metrics["val/cluster_mIoU_identity"])  # kept for later epochs
    module.identity_miou = 0.123  # as loaded from a checkpoint of a run on other data: validate recomputes it
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/cluster_mIoU_identity"] == metrics["val/cluster_mIoU"] != 0.123


def test_module_needs_class_names():
    with pytest.raises(ValueError, match="needs the dataset's class names"):
        EnhancerModule(blip="scratch:tiny")
    with pytest.raises(ValueError, match="unknown scratch size 'huge'"):
        EnhancerModule(blip="scratch:huge", classes=CLASSES)


def test_per_image_contrast_averages_the_loss_of_each_image():
    from test_lit_grouping import naive_supcon

    classes = ["a", "b", "c"]
    module = EnhancerModule(blip="scratch:tiny", classes=classes, contrast="image", keep_weight=0.0, temperature=0.5)
    rng = np.random.default_rng(0)
    enhanced = torch.as_tensor(rng.normal(size=(2, 6, 4)))
    labels = torch.tensor([[0, 0, 1, 1, -1, 2], [2, 2, 2, 0, 1, 1]])
    got = module.loss(enhanced, enhanced, labels)["group"]
    per_image = [
        naive_supcon(enhanced[b][labels[b] >= 0].numpy(), labels[b][labels[b] >= 0].numpy(), 0.5) for b in (0, 1)
    ]
    assert got.item() == pytest.approx(np.mean(per_image), rel=1e-5)
    batch = EnhancerModule(blip="scratch:tiny", classes=classes, keep_weight=0.0, temperature=0.5)
    flat = labels.reshape(-1) >= 0
    expected_batch = naive_supcon(enhanced.reshape(-1, 4)[flat].numpy(), labels.reshape(-1)[flat].numpy(), 0.5)
    assert batch.loss(enhanced, enhanced, labels)["group"].item() == pytest.approx(expected_batch, rel=1e-5)
    with pytest.raises(ValueError, match="contrast 'pixel' unknown"):
        EnhancerModule(blip="scratch:tiny", classes=classes, contrast="pixel")
