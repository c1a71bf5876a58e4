"""CaptionerModule: region states as at inference, prompt-masked LM loss, overfitting, validation accuracy, export,
``train.py fit`` on the debug config; captions carried through the data module; scratch sizes from the config."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_cli import debug_args, scalars

from autoseg.cli.train import cli_main
from autoseg.data.datamodules import DataSource, SegmentationDataModule, ShapesWorldSpec
from autoseg.data.shapes import STUFF_CLASSES, ShapesConfig, generate_sample
from autoseg.lit import CaptionerModule
from autoseg.models.blip import BlipCaptioner, CaptionConfig
from autoseg.models.blip import load_blip as build_blip

CONFIG = ShapesConfig(size=64)
CLASSES = list(CONFIG.classes)
GREEDY = CaptionConfig(sample=False, min_new_tokens=1, max_new_tokens=12)


def shapes_items(n=2, seed=0):
    """ShapesWorld samples as data-module items: PIL image, mask and the captions dict."""
    out = []
    for i in range(n):
        image, mask, captions = generate_sample(seed, i, CONFIG)
        out.append({"image": image, "mask": mask, "name": f"{i:06d}", "captions": captions})
    return out


@pytest.fixture(scope="module")
def caption_batch(batch):
    """The shared two-sample ShapesWorld batch (conftest) with its captions, as the data module carries them."""
    return {**batch, "captions": [item["captions"] for item in shapes_items()]}


def module(**kwargs):
    return CaptionerModule(**{"blip": "scratch:tiny", "classes": CLASSES, **kwargs})


def naive_majority(mask: np.ndarray, patch: int) -> np.ndarray:
    """Majority class of each ``patch x patch`` cell (ties: smaller id; 255 never wins; -1 if mostly 255)."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    out = np.full((h, w), -1)
    for i in range(h):
        for j in range(w):
            cell = mask[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].ravel()
            scored = cell[cell != 255]
            if len(scored) >= cell.size / 2:
                out[i, j] = np.bincount(scored).argmax()
    return out


@pytest.mark.parametrize("mode", ["global", "concat"])
def test_region_states_are_what_inference_builds_for_the_same_region(caption_batch, mode):
    """Inference path: BlipCaptioner.encode on the PIL image, cluster map = each patch's majority class, then
    cluster_states; the module must give the same states for each region."""
    m = module(caption_mode=mode).eval()
    with torch.no_grad():
        _, (regions, states) = m._step(caption_batch)
        item = shapes_items()[1]  # the second image of the batch
        tokens = m.blip.encode([item["image"]], [64])[0]
        majority = naive_majority(np.asarray(item["mask"]), m.blip.patch_size)
        present = sorted(c for c in np.unique(majority) if c >= 0)
        cluster_map = torch.as_tensor(np.searchsorted(present, majority))  # clusters 0..K-1 in class order
        expected = m.blip.cluster_states(tokens, 0, cluster_map, mode)
    mine = [s for r, s in zip(regions, states, strict=True) if r.image == 1]
    assert [r.class_id for r in regions if r.image == 1] == present
    assert len(mine) == len(expected) == len(present) >= 2
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_prompt_tokens_are_masked_out_of_the_labels():
    m = module()
    ids, attention, labels = m.text_targets(["a red star", "a picture of the sky", "grass"])
    tok = m.blip.processor.tokenizer
    dec, sep = tok.convert_tokens_to_ids("[DEC]"), tok.sep_token_id
    prompt = [dec] + tok.convert_tokens_to_ids(["a", "picture", "of"])
    words = [["a", "red", "star"], ["the", "sky"], ["grass"]]  # "a picture of" is not said twice
    for row, w in enumerate(words):
        caption = tok.convert_tokens_to_ids(w) + [sep]
        n = len(prompt) + len(caption)
        assert ids[row, :n].tolist() == prompt + caption
        assert labels[row].tolist() == [-100] * len(prompt) + caption + [-100] * (ids.shape[1] - n)
        assert attention[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)


@pytest.mark.parametrize("lengths", [(5, 3), (2, 300, 3, 290, 4, 310, 1)])
def test_lm_loss_is_the_mean_next_token_loss_of_the_caption_tokens_only(lengths):
    # the second case splits into several decoder passes of similar lengths (length_groups)
    torch.manual_seed(0)
    m = module().eval()
    states = [torch.randn(n, 32) for n in lengths]
    captions = ["a red star", "sky", "two big squares", "a cross", "grass", "the blue circle near a star", "wall"]
    captions = captions[: len(states)]
    loss = m.lm_loss(states, captions)
    tok = m.blip.processor.tokenizer
    prompt = ["[DEC]", "a", "picture", "of"]
    terms = []
    for s, c in zip(states, captions, strict=True):  # each caption alone: no padding anywhere
        ids = torch.tensor([tok.convert_tokens_to_ids(prompt + c.split() + ["[SEP]"])])
        logits = m.blip.model.text_decoder(input_ids=ids, encoder_hidden_states=s[None]).logits[0]
        for pos in range(len(prompt), ids.shape[1]):  # predict caption token `pos` from the tokens before it
            terms.append(-torch.log_softmax(logits[pos - 1], -1)[ids[0, pos]])
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_overfits_one_batch_and_then_captions_each_region_with_its_class(caption_batch):
    torch.manual_seed(0)
    m = module()
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    losses = []
    for _ in range(40):
        loss = m._step(caption_batch)[0]["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])  # measured: 10.3 -> 0.26
    m.eval()
    with torch.no_grad():
        _, (regions, states) = m._step(caption_batch)
        captions = [c[0] for c in m.blip.caption(states, GREEDY)]
    names = [CLASSES[r.class_id] for r in regions]
    assert len(regions) == 9
    hits = [
        name in caption.split() or name + "s" in caption.split() for name, caption in zip(names, captions, strict=True)
    ]
    assert sum(hits) >= 8, list(zip(names, captions, strict=True))


def test_auxiliary_head_and_frozen_vision(caption_batch):
    m = module(aux_weight=0.5, freeze_vision=True)
    vision_before = {k: v.clone() for k, v in m.blip.model.vision_model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    assert not m.blip.model.vision_model.training and m.blip.model.text_decoder.training
    for _ in range(3):
        losses = m._step(caption_batch)[0]
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    torch.testing.assert_close(losses["loss"], losses["lm_loss"] + 0.5 * losses["aux_loss"])
    after = m.blip.model.vision_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in vision_before.items())
    assert m.frozen_prefixes() == ("blip.model.vision_model.",)


def test_vision_only_stage_trains_the_encoder_and_head_but_not_the_decoder(caption_batch):
    m = module(aux_weight=1.0, lm_weight=0.0)
    m.train()
    losses = m._step(caption_batch)[0]
    assert set(losses) == {"aux_loss", "loss"}
    losses["loss"].backward()
    assert m.blip.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert m.aux_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.blip.model.text_decoder.parameters())
    m.eval()
    with torch.no_grad():
        losses, (regions, states) = m._step(caption_batch)
        logits = m.aux_head(m(caption_batch["image"]).patches)
    assert regions == [] and states == []
    # the accuracy recomputed from the head's own predictions and the naive majority labels of the masks
    patch = m.blip.patch_size
    labels = torch.stack([torch.from_numpy(naive_majority(mk.numpy(), patch)).ravel() for mk in caption_batch["mask"]])
    scored = labels >= 0
    expected = (logits.argmax(-1) == labels)[scored].float().mean()
    torch.testing.assert_close(losses["patch_acc"], expected)
    with pytest.raises(ValueError, match="set aux_weight > 0"):
        module(aux_weight=0.0, lm_weight=0.0)
    with pytest.raises(ValueError, match="freeze_vision false"):
        module(aux_weight=1.0, lm_weight=0.0, freeze_vision=True)


def test_export_from_a_checkpoint_state_keeps_frozen_weights_and_drops_the_head(tmp_path):
    m = module(aux_weight=1.0, freeze_vision=True)
    state = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("blip.model.vision_model.")}
    state["blip.model.text_decoder.cls.predictions.bias"] += 1.0
    out = m.export(tmp_path, state_dict=state)
    loaded = BlipCaptioner.from_pretrained(str(out))
    got = loaded.model.state_dict()
    bias = "text_decoder.cls.predictions.bias"
    torch.testing.assert_close(got[bias], m.blip.model.state_dict()[bias] + 1.0)
    key = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(got[key], m.blip.model.state_dict()[key])
    assert not any("aux" in k for k in got)
    assert json.loads((out / "autoseg_training.json").read_text())["classes"] == CLASSES


def test_names_class_checks_nouns_and_whole_multiword_names():
    m = CaptionerModule(blip="scratch:tiny", classes=["circle", "brick wall", "sky"])
    captions = ["two circles on the grass", "a red circle", "a wall", "an old brick wall", "a circular sky"]
    nouns = m.nouns.nouns_per_caption(captions)
    got = [[m.names_class(c, n, k) for k in range(3)] for c, n in zip(captions, nouns, strict=True)]
    assert got == [
        [True, False, False],  # plural lemmatised
        [True, False, False],
        [False, False, False],  # "wall" alone is not "brick wall"
        [False, True, False],
        [False, False, True],  # "circular" is no noun
    ]


def test_regions_need_captions_of_the_same_classes_or_a_fallback(caption_batch):
    bad = [dict(c, regions=[{"class": "grass", "class_id": 0, "caption": "grass"}]) for c in caption_batch["captions"]]
    with pytest.raises(ValueError, match="class_id 0 is sky"):
        module()._step({**caption_batch, "captions": bad})
    m = module().train()
    with pytest.raises(ValueError, match="no captions.*fallback_template"):
        m._step({k: v for k, v in caption_batch.items() if k != "captions"})
    m = module(fallback_template="{}", image_caption=True)
    labels = torch.tensor([[0, 0, 7, -1]])
    regions, full = m.regions(labels, [None])
    assert [(r.class_id, r.caption) for r in regions] == [(0, "sky"), (7, "triangle")] and full == [""]


def test_validation_accuracy_counts_regions_whose_greedy_caption_names_the_class(tmp_path):
    dm = SegmentationDataModule(
        shapesworld=ShapesWorldSpec(root=str(tmp_path), n_train=2, n_val=3, size=64),
        image_size=64,
        batch_size=2,
        num_workers=0,
    )
    groups = {"stuff": list(STUFF_CLASSES), "things": [c for c in CLASSES if c not in STUFF_CLASSES]}
    m = CaptionerModule(blip="scratch:tiny", classes=dm.classes, class_groups=groups, val_caption={"max_new_tokens": 6})
    torch.manual_seed(0)
    with torch.no_grad():  # make the untrained decoder always say "sky ...": only sky regions are right
        bias = m.blip.model.text_decoder.cls.predictions.bias
        bias[m.blip.processor.tokenizer.convert_tokens_to_ids("sky")] = 1e4
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(m, datamodule=dm, verbose=False)
    regions = []
    for b in dm.val_dataloader():
        for mask in b["mask"].numpy():
            majority = naive_majority(mask, 8)
            regions += [CLASSES[c] for c in np.unique(majority) if c >= 0]
    stuff = [c for c in regions if c in STUFF_CLASSES]
    assert regions.count("sky") >= 1 and len(stuff) < len(regions)  # the check below is not trivial
    assert metrics["val/region_caption_acc"] == pytest.approx(regions.count("sky") / len(regions))
    assert metrics["val/region_caption_acc/stuff"] == pytest.approx(stuff.count("sky") / len(stuff))
    assert metrics["val/region_caption_acc/things"] == 0.0
    assert metrics["val/lm_loss"] > 0


def test_datamodule_carries_captions_from_folders_and_shards(tmp_path):
    from autoseg.data.shapes import write_dataset
    from autoseg.data.shards import write_shards

    write_dataset(tmp_path / "ds", 3, 0, CONFIG, progress=False)
    write_shards(tmp_path / "ds", tmp_path / "shards", progress=False)
    expected = [json.loads((tmp_path / "ds" / "captions" / f"{i:06d}.json").read_text()) for i in range(3)]
    for source in (DataSource("folder", str(tmp_path / "ds")), DataSource("shards", str(tmp_path / "shards"))):
        dm = SegmentationDataModule(val=source, image_size=32, batch_size=3, num_workers=0)
        batch = next(iter(dm.val_dataloader()))
        assert batch["captions"] == expected and batch["image"].shape == (3, 3, 32, 32)
    (tmp_path / "ds" / "captions" / "000001.json").unlink()
    dm = SegmentationDataModule(val=DataSource("folder", str(tmp_path / "ds")), batch_size=3, num_workers=0)
    assert next(iter(dm.val_dataloader()))["captions"] == [expected[0], None, expected[2]]


def test_scratch_sizes_come_from_the_config():
    blip = build_blip("scratch:tiny", scratch={"hidden_size": 48, "patch_size": 16, "text_layers": 1})
    vision, text = blip.model.config.vision_config, blip.model.config.text_config
    assert (vision.hidden_size, vision.patch_size, vision.num_hidden_layers) == (48, 16, 2)
    assert (text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size) == (48, 1, 48)
    with pytest.raises(ValueError, match=r"BLIP scratch options \['depth'\] unknown; allowed: .*hidden_size"):
        build_blip("scratch:tiny", scratch={"depth": 2})
    with pytest.raises(ValueError, match="only apply to 'scratch:NAME' sources"):
        build_blip("some/dir", scratch={"hidden_size": 48})
    with pytest.raises(ValueError, match="caption_mode 'local' unknown"):
        module(caption_mode="local")


@pytest.fixture(scope="module")
def captioner_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner")
    cli = cli_main(["fit", *debug_args("captioner", root, "--trainer.max_steps=6")])
    return root, cli


def test_fit_writes_checkpoint_events_and_an_export_that_captions_differently(captioner_run):
    root, cli = captioner_run
    log_dir = root / "runs" / "lightning_logs" / "version_0"
    assert cli.trainer.global_step == 6
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    tags, _ = scalars(log_dir)
    for tag in ("train/lm_loss", "val/lm_loss", "val/region_caption_acc", "val/region_caption_acc/things"):
        assert tag in tags, sorted(tags)
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    (text_tag,) = acc.Tags()["tensors"]
    table = acc.Tensors(text_tag)[-1].tensor_proto.string_val[0].decode()
    assert text_tag.startswith("val/captions") and table.startswith("| image | class | target | caption |")

    exported = BlipCaptioner.from_pretrained(str(log_dir / "export" / "last" / "blip"))
    trained = cli.model.blip
    for k, v in exported.model.state_dict().items():
        assert torch.equal(v, trained.model.state_dict()[k])
    untrained = build_blip("scratch:tiny")
    image = shapes_items(1, seed=5)[0]["image"]
    captions = []
    for blip in (exported, untrained):
        with torch.no_grad():
            tokens = blip.encode([image], [64])[0]
            states = blip.cluster_states(tokens, 0, torch.zeros(tokens.grid, dtype=torch.long), "global")
            captions.append(blip.caption(states, GREEDY)[0][0])
    assert captions[0] != captions[1], captions


def test_checkpoint_loads_without_a_trainer(captioner_run):
    root, cli = captioner_run
    path = root / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    m = CaptionerModule.load_from_checkpoint(path, map_location="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    key = "blip.model.text_decoder.cls.predictions.bias"
    assert torch.equal(m.state_dict()[key], state[key]) and m.hparams.classes == CLASSES


def test_gpu_config_parses(capsys):
    """configs/captioner.yaml needs BLIP-large and ADE20K to run; here it must at least parse and resolve."""
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "-c", "configs/captioner.yaml", "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: autoseg.lit.CaptionerModule" in printed and "freeze_vision: true" in printed


def test_pad_rows_equals_pad_sequence_forward_and_backward():
    from autoseg.lit.batching import pad_rows

    torch.manual_seed(0)
    rows = [torch.randn(n, 5, requires_grad=True) for n in (3, 7, 1, 7)]
    padded, mask = pad_rows(rows)
    reference = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    assert torch.equal(padded, reference) and padded.shape == (4, 7, 5)
    assert mask.tolist() == [[t < n for t in range(7)] for n in (3, 7, 1, 7)]
    weights = torch.randn(4, 7, 5)
    ours = torch.autograd.grad((padded * weights).sum(), rows)
    theirs = torch.autograd.grad((reference * weights).sum(), rows)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert torch.equal(ours[1], weights[1]) and torch.equal(ours[2], weights[2, :1])  # each row's own weights


def test_grouped_decoder_passes_give_the_one_pass_gradients(monkeypatch):
    import autoseg.lit.captioner as captioner

    torch.manual_seed(0)
    m = module()
    states = [torch.randn(n, 32, requires_grad=True) for n in (2, 300, 3, 290, 4, 310, 1)]
    captions = ["a red star", "sky", "two big squares", "a cross", "grass", "the blue circle near a star", "wall"]
    assert len(captioner.length_groups([s.shape[0] for s in states])) > 1
    grads = []
    for one_pass in (False, True):
        if one_pass:
            monkeypatch.setattr(captioner, "length_groups", lambda lengths: [list(range(len(lengths)))])
        loss = m.lm_loss(states, captions)
        grads.append([loss, *torch.autograd.grad(loss, [*states, *m.blip.model.text_decoder.parameters()])])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_is_the_cheapest_split_of_the_sorted_lengths(seed):
    import itertools

    from autoseg.lit.batching import length_groups

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 150, rng.integers(1, 9)).tolist()
    groups = length_groups(lengths, max_groups=3, pass_cost=40)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))

    def cost(parts):
        return sum(len(p) * max(lengths[i] for i in p) for p in parts) + 40 * (len(parts) - 1)

    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = min(
        cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, len(order)))])
        for k in range(3)
        for cuts in itertools.combinations(range(1, len(order)), k)
    )
    assert cost(groups) == best
