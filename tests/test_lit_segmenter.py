"""SegmenterModule: overfits one batch, trains only the decoder unless asked, exports a directory infer.py loads."""

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.data.datamodules import DataSource, SegmentationDataModule, ShapesWorldSpec
from autoseg.data.shapes import ShapesConfig
from autoseg.lit import SegmenterModule
from autoseg.models.segmenters import CLIPSegSegmenter

CLASSES = list(ShapesConfig().classes)
ONE_TEMPLATE = ["a photo of a {}."]


def fit_steps(module, batch, steps, lr=3e-3):
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    module.train()
    losses = []
    for _ in range(steps):
        loss = module.loss(module(batch["image"]), batch["mask"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_decoder_overfits_one_batch_with_cross_entropy(batch):
    torch.manual_seed(0)
    module = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE, loss="ce")
    clip_before = {k: v.clone() for k, v in module.segmenter.model.clip.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in module.segmenter.model.decoder.state_dict().items()}
    losses = fit_steps(module, batch, 60)
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])  # measured: 3.4 -> 0.3
    with torch.no_grad():
        accuracy = (module(batch["image"]).argmax(1) == batch["mask"]).float().mean().item()
    assert accuracy > 0.7
    clip_after = module.segmenter.model.clip.state_dict()
    assert all(torch.equal(v, clip_after[k]) for k, v in clip_before.items())  # CLIP frozen
    decoder_after = module.segmenter.model.decoder.state_dict()
    assert any(not torch.equal(v, decoder_after[k]) for k, v in decoder_before.items())


def test_ce_plus_bce_loss_falls(batch):
    torch.manual_seed(0)
    module = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE, loss="ce+bce")
    losses = fit_steps(module, batch, 80)
    late = sum(losses[-10:]) / 10  # the mean of the last steps: single steps are noisy with dropout on
    assert late < losses[0] / 2, (losses[0], late)  # measured: 3.13 -> 1.25 (BCE falls slowly)


def test_loss_ignores_unscored_pixels_and_matches_torch_references():
    module = SegmenterModule(segmenter="scratch:tiny", classes=["a", "b", "c"], templates=ONE_TEMPLATE, loss="ce+bce")
    logits = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, :2] = 255
    out = module.loss(logits, mask)
    keep = mask != 255
    flat_logits = logits.permute(0, 2, 3, 1)[keep]  # n x C
    ce = torch.nn.functional.cross_entropy(flat_logits, mask[keep])
    onehot = torch.nn.functional.one_hot(mask[keep], 3).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(flat_logits, onehot)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["bce"], bce)
    torch.testing.assert_close(out["loss"], ce + bce)


def test_unfreeze_clip_trains_clip_too():
    module = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE, unfreeze_clip=True)
    assert all(p.requires_grad for p in module.segmenter.model.parameters())
    assert module.frozen_prefixes() == ()
    frozen = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("segmenter.model.decoder.") for n in trainable)


def test_export_loads_with_the_segmenter_loader_and_gives_the_same_logits(tmp_path, batch):
    torch.manual_seed(0)
    module = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE)
    fit_steps(module, batch, 3)
    module.eval()
    out = module.export(tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    loaded = CLIPSegSegmenter.from_pretrained(str(out), templates=ONE_TEMPLATE)
    pixels = (batch["image"] - module.pixel_mean) / module.pixel_std
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(pixels, CLASSES), module.segmenter.logits(pixels, CLASSES))


def test_validation_miou_equals_an_independent_confusion_matrix(tmp_path):
    dm = SegmentationDataModule(
        shapesworld=ShapesWorldSpec(root=str(tmp_path), n_train=2, n_val=3, size=64),
        image_size=64,
        batch_size=2,
        num_workers=0,
    )
    module = SegmenterModule(segmenter="scratch:tiny", classes=dm.classes, templates=ONE_TEMPLATE)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)

    inter, union = np.zeros(len(dm.classes)), np.zeros(len(dm.classes))
    with torch.no_grad():
        for b in dm.val_dataloader():
            pred, gt = module(b["image"]).argmax(1).numpy(), b["mask"].numpy()
            for c in range(len(dm.classes)):
                inter[c] += ((pred == c) & (gt == c)).sum()
                union[c] += ((pred == c) | (gt == c)).sum()
    expected = np.mean(inter[union > 0] / union[union > 0])
    assert metrics["val/mIoU"] == pytest.approx(expected, rel=1e-5)
    for c, name in enumerate(dm.classes):  # per-class IoU logged for every class that occurs
        if union[c] > 0:
            assert metrics[f"val/iou/{name}"] == pytest.approx(inter[c] / union[c], rel=1e-5)
        else:
            assert f"val/iou/{name}" not in metrics


def test_patch_loss_stage_trains_only_the_vision_tower_and_head(batch):
    """decoder_loss_weight 0: the cheap first stage of a from-scratch recipe (no per-class decoding)."""
    torch.manual_seed(0)
    weights = [1.0] * 5 + [3.0] * 5
    module = SegmenterModule(
        segmenter="scratch:tiny",
        classes=CLASSES,
        templates=ONE_TEMPLATE,
        unfreeze_clip=True,
        patch_loss_weight=1.0,
        decoder_loss_weight=0.0,
        class_weights=weights,
    )
    decoder_before = {k: v.clone() for k, v in module.segmenter.model.decoder.state_dict().items()}
    vision_before = module.segmenter.model.clip.vision_model.embeddings.patch_embedding.weight.clone()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        logits, patch = module._outputs(batch["image"], decode=False)
        assert logits is None and patch.shape == (2, 64, len(CLASSES))  # 64 px / patch 8 = 8 x 8
        out = module.loss(logits, batch["mask"], patch)
        assert set(out) == {"patch", "loss"}
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
    decoder_after = module.segmenter.model.decoder.state_dict()
    assert all(torch.equal(v, decoder_after[k]) for k, v in decoder_before.items())
    assert not torch.equal(vision_before, module.segmenter.model.clip.vision_model.embeddings.patch_embedding.weight)


def test_patch_loss_targets_are_majority_classes_with_class_weights():
    module = SegmenterModule(
        segmenter="scratch:tiny",
        classes=["a", "b"],
        templates=ONE_TEMPLATE,
        patch_loss_weight=1.0,
        decoder_loss_weight=0.0,
        class_weights=[1.0, 4.0],
    )
    mask = torch.zeros(1, 16, 16, dtype=torch.long)  # patch 8: a 2 x 2 grid
    mask[0, :8, 8:] = 1  # top-right patch is class b
    mask[0, 8:, :8] = 255  # bottom-left patch is unscored
    patch_logits = torch.randn(1, 4, 2)
    got = module.loss(None, mask, patch_logits)["patch"]
    # by hand: patches 0, 1, 3 have targets a, b, a; weighted mean = sum(w_t * nll) / sum(w_t)
    nll = -torch.log_softmax(patch_logits[0], -1)
    expected = (1 * nll[0, 0] + 4 * nll[1, 1] + 1 * nll[3, 0]) / (1 + 4 + 1)
    assert torch.allclose(got, expected)


def test_scratch_size_overrides_and_bad_settings():
    module = SegmenterModule(
        segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE, scratch={"patch_size": 16, "hidden_size": 48}
    )
    vision = module.segmenter.model.config.vision_config
    assert (vision.patch_size, vision.hidden_size) == (16, 48)
    with pytest.raises(ValueError, match="class_weights has 2 values"):
        SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="nothing to train"):
        SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, decoder_loss_weight=0.0)
    with pytest.raises(ValueError, match="scratch options \\['depth'\\] unknown"):
        SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, scratch={"depth": 3})
    with pytest.raises(ValueError, match="only apply to 'scratch:NAME'"):
        SegmenterModule(segmenter="CIDAS/clipseg-rd64-refined", classes=CLASSES, scratch={"patch_size": 16})


# ------------------------------------------------------------------------------------------- SAM 3 backend
def sam3_module(**kwargs):
    return SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, backend="sam3", **kwargs)


@pytest.mark.parametrize("loss", ["ce", "bce", "ce+bce"])
def test_sam3_semantic_head_trains_with_each_loss_and_the_backbone_stays_frozen(batch, loss):
    torch.manual_seed(0)
    module = sam3_module(loss=loss)
    trainable = {n.split(".")[2] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"detr_encoder", "mask_decoder"}  # segmenter.model.<part>
    frozen = {k: v.clone() for k, v in module.segmenter.model.vision_encoder.state_dict().items()}
    head = {k: v.clone() for k, v in module.segmenter.model.mask_decoder.state_dict().items()}
    losses = fit_steps(module, batch, 60 if loss == "ce" else 12)
    if loss == "ce":
        assert losses[-1] < losses[0] / 2, (losses[0], losses[-1])  # measured: 2.30 -> 0.99 in 60 steps
    else:
        assert losses[-1] < losses[0], (losses[0], losses[-1])
    after = module.segmenter.model.vision_encoder.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, module.segmenter.model.mask_decoder.state_dict()[k]) for k, v in head.items())
    assert module.frozen_prefixes() == tuple(
        f"segmenter.model.{p}."
        for p in (
            "vision_encoder",
            "text_encoder",
            "text_projection",
            "geometry_encoder",
            "detr_decoder",
            "dot_product_scoring",
        )
    )


def test_sam3_unfreeze_backbone_and_clipseg_only_options():
    module = sam3_module(unfreeze_backbone=True)
    trainable = {n.split(".")[2] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"vision_encoder", "text_encoder", "text_projection", "detr_encoder", "mask_decoder"}
    with pytest.raises(
        ValueError, match="templates is a setting of the CLIPSeg decoder; backend 'sam3' has no templates"
    ):
        sam3_module(templates=ONE_TEMPLATE)
    with pytest.raises(ValueError, match="patch_loss_weight needs the CLIPSeg vision tower; backend 'sam3' has no"):
        sam3_module(patch_loss_weight=1.0)
    with pytest.raises(
        ValueError, match=r"backend 'grounded_sam' cannot be fine-tuned; choose one of \['clipseg', 'sam3'\]"
    ):
        SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, backend="grounded_sam")


def test_sam3_resizes_to_its_input_size_and_exports_what_infer_loads(tmp_path, batch):
    from autoseg.models.segmenters import SegmenterConfig, build_segmenter

    torch.manual_seed(0)
    module = sam3_module()
    fit_steps(module, batch, 3)
    module.eval()
    images = torch.nn.functional.interpolate(batch["image"], size=(48, 40), mode="bilinear")  # not the model's 64 px
    with torch.no_grad():
        assert module(images).shape == (2, len(CLASSES), 48, 40)
    out = module.export(tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    loaded = build_segmenter(SegmenterConfig(name="sam3", source=str(out)))
    pixels = module._pixels(batch["image"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(pixels, CLASSES), module.segmenter.logits(pixels, CLASSES))


def test_sam3_module_decodes_pair_chunks_with_the_logits_and_gradients_of_one_call(batch):
    """2 images x 5 classes with pair_chunk 2: the DETR encoder and mask decoder never see more than 2 pairs (also
    when the backward recomputes a chunk), autograd keeps no chunk's activations for the backward (memory bounded by
    one chunk), and logits and head gradients equal those of all 10 pairs in one call."""
    classes = CLASSES[:5]
    module = SegmenterModule(segmenter="scratch:tiny", classes=classes, backend="sam3")
    module.eval()  # dropout off: chunked and unchunked runs must not draw different masks
    seg = module.segmenter
    seen: list[int] = []  # pairs per call of each head part
    hooks = [
        seg.model.detr_encoder.register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state.shape[0])),
        seg.model.mask_decoder.register_forward_hook(lambda m, a, out: seen.append(out.semantic_seg.shape[0])),
    ]
    head = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    mask = torch.where(batch["mask"] < 5, batch["mask"], 255)  # the other classes' pixels unscored

    def run(pair_chunk):
        seg.pair_chunk = pair_chunk
        module.zero_grad()
        seen.clear()
        kept: dict[int, int] = {}  # storages autograd keeps for the backward: address -> bytes

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = module(batch["image"])
        forward_calls = list(seen)
        module.loss(logits, mask)["loss"].backward()
        grads = {n: p.grad.clone() for n, p in head if p.grad is not None}
        return logits.detach(), grads, forward_calls, list(seen), sum(kept.values())

    try:
        whole, whole_grads, whole_calls, _, whole_kept = run(10)
        chunked, chunked_grads, chunked_calls, all_calls, chunked_kept = run(2)
    finally:
        for h in hooks:
            h.remove()
    assert whole_calls == [10, 10]  # one DETR encoder and one mask decoder call for all pairs
    assert chunked_calls == [2, 2] * 5 and max(all_calls) == 2
    assert chunked_kept * 10 < whole_kept  # less than one pair's share of the activations (measured: 160 B vs 9.6 MB)
    assert whole.shape == (2, 5, 64, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert whole_grads.keys() == chunked_grads.keys()
    assert any(n.endswith("semantic_projection.weight") for n in whole_grads)  # the semantic head gets gradients
    for n, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_sam3_evaluation_feeds_the_pixels_inference_gives_the_original_images(tmp_path, monkeypatch, stage):
    """data.image_size 48 is not SAM 3's 64 px side: evaluation images are still resized once, from the original, to
    64 x 64 (what Sam3Segmenter.preprocess gives at inference), not to 48 and then again to 64."""
    rng = np.random.default_rng(0)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    originals = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(50, 90), (70, 40)]]
    for i, image in enumerate(originals):
        image.save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 3, image.size[::-1], dtype=np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    dm = SegmentationDataModule(val=DataSource("folder", str(tmp_path)), image_size=48, batch_size=2, num_workers=0)
    module = SegmenterModule(segmenter="scratch:tiny", classes=dm.classes, backend="sam3")
    seg, fed = module.segmenter, []
    encode = seg.encode_image
    monkeypatch.setattr(seg, "encode_image", lambda pixels: (fed.append(pixels.detach().clone()), encode(pixels))[1])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    getattr(trainer, stage)(module, datamodule=dm, **({} if stage == "predict" else {"verbose": False}))
    with torch.no_grad():
        expected = seg.preprocess(originals)  # inference: SAM 3's processor on the original PIL images
    assert expected.shape == (2, 3, 64, 64) and len(fed) == 1
    torch.testing.assert_close(fed[0], expected, rtol=0, atol=1e-5)


def test_pair_chunk_option_sets_the_training_chunk_and_is_checked():
    module = SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, pair_chunk=40)
    assert module.segmenter.pair_chunk == 40
    assert SegmenterModule(segmenter="scratch:tiny", classes=CLASSES).segmenter.pair_chunk == 8  # the segmenter's own
    with pytest.raises(ValueError, match="pair_chunk"):
        SegmenterModule(segmenter="scratch:tiny", classes=CLASSES, pair_chunk=0)


def test_train_names_decodes_present_and_hardest_absent_classes_with_the_loss_of_those_names(batch):
    """Each image's own classes plus the absent classes its patch head scores highest; the loss equals a
    cross-entropy over just those names computed from the all-pairs logits, and gradients reach the decoder."""
    torch.manual_seed(0)
    kwargs = dict(segmenter="scratch:tiny", classes=CLASSES, templates=ONE_TEMPLATE, unfreeze_clip=True)
    module = SegmenterModule(**kwargs, patch_loss_weight=0.5, train_names=6, class_weights=[1.0] * 5 + [3.0] * 5)
    module.eval()  # no dropout: the two passes below must see the same network
    mask = batch["mask"].clone()
    mask[0, :4] = 255  # unscored pixels pick no class
    logits, patch = module._outputs(batch["image"], mask=mask)
    images, names = module.training_names(mask, patch.detach())
    chosen = torch.zeros(2, len(CLASSES), dtype=torch.bool)
    chosen[images, names] = True
    for b in range(2):
        present = set(mask[b][mask[b] != 255].unique().tolist())
        picked = set(chosen[b].nonzero().flatten().tolist())
        assert present <= picked and len(picked) == max(6, len(present))
        strongest = patch[b].amax(0)  # B x N x C -> the strongest patch of each class
        absent = [c for c in range(len(CLASSES)) if c not in present]
        ranked = sorted(absent, key=lambda c: -strongest[c].item())[: len(picked) - len(present)]
        assert picked - present == set(ranked)
        assert torch.isinf(logits[b][~chosen[b]]).all() and torch.isfinite(logits[b][chosen[b]]).all()
    everything, _ = module._outputs(batch["image"])  # every pair decoded: the reference
    restricted = everything.masked_fill(~chosen[:, :, None, None], float("-inf"))
    torch.testing.assert_close(logits, restricted, rtol=1e-5, atol=1e-5)
    log_p = restricted.log_softmax(1).gather(1, mask.clamp(max=len(CLASSES) - 1)[:, None])[:, 0]
    weight = module.class_weights[mask.clamp(max=len(CLASSES) - 1)] * (mask != 255)
    expected = -(log_p * weight).sum() / weight.sum()
    torch.testing.assert_close(module.loss(logits, mask)["ce"], expected, rtol=1e-5, atol=1e-6)
    module.loss(logits, mask, patch)["loss"].backward()
    grads = [p.grad for p in module.segmenter.model.decoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # more names than classes: every pair, as without the option
    wide = SegmenterModule(**kwargs, patch_loss_weight=0.5, train_names=len(CLASSES))
    wide.eval()
    torch.testing.assert_close(wide._outputs(batch["image"], mask=mask)[0], wide._outputs(batch["image"])[0])
    for bad in (dict(train_names=0, patch_loss_weight=1.0), dict(train_names=4), dict(train_names=4, loss="bce")):
        with pytest.raises(ValueError, match="train_names"):
            SegmenterModule(**kwargs, **bad)
