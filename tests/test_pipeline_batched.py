"""The batched vocabulary stage: an image's output does not depend on its batch, and each stage runs once per batch."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.api import build_pipeline
from autoseg.cli.common import overrides_from_args
from autoseg.cli.infer import build_parser
from autoseg.config import ConfigError, load_config
from autoseg.models.blip import CaptionConfig
from autoseg.models.blip_decoding import MIN_BUCKET, GumbelSampler, bucket_length
from autoseg.pipeline import STAGES, AutoSegPipeline
from autoseg.vocab.bboost import BBoost, BBoostConfig, batched_kmeans, kmeans, kmeans_draws

SIZES = [(48, 64), (64, 64), (80, 56), (40, 96), (72, 72)]


def block_images(seed: int = 0) -> list[Image.Image]:
    """Five images of different sizes, each three noisy colour blocks."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:
        a = np.zeros((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        a[: h // 2, : w // 2] = rng.integers(0, 255, 3)
        a[h // 3 :, w // 2 :] = rng.integers(0, 255, 3)
        out.append(Image.fromarray(np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def config(tiny_blip_dir, tiny_clipseg_dir):
    return load_config(
        "configs/debug/pipeline.yaml", {"blip": str(tiny_blip_dir), "segmenter": {"source": str(tiny_clipseg_dir)}}
    )


def build(config, **changes) -> AutoSegPipeline:
    """The pipeline of ``config`` with top-level fields changed (``caption`` given as a dict of its fields)."""
    if "caption" in changes:
        changes["caption"] = dataclasses.replace(config.caption, **changes["caption"])
    return build_pipeline(dataclasses.replace(config, **changes))


@pytest.fixture(scope="module")
def greedy(config):
    return build(config, caption={"sample": False})


@pytest.fixture(scope="module")
def sampling(config):
    assert config.caption.sample and config.caption.n_passes == 2
    return build(config)


@pytest.fixture(scope="module")
def images():
    return block_images()


def assert_same(a, b):
    """Two lists of predictions are identical (vocabularies, captions, cluster maps, label maps)."""
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        assert p.vocabulary == q.vocabulary
        assert p.captions == q.captions
        assert p.extra["cluster_nouns"] == q.extra["cluster_nouns"]
        np.testing.assert_array_equal(p.cluster_map, q.cluster_map)
        np.testing.assert_array_equal(p.label_map, q.label_map)


def run_in_batches(pipeline, images, size):
    return [p for i in range(0, len(images), size) for p in pipeline(images[i : i + size])]


def test_greedy_batch_equals_one_image_at_a_time(greedy, images):
    batched = greedy(images)
    assert_same(batched, [greedy([im])[0] for im in images])
    assert sum(len(p.captions) for p in batched) > len(images)  # several clusters, each with a non-empty caption
    assert all(c for p in batched for caps in p.captions.values() for c in caps)
    assert all(len(c) == 1 for p in batched for c in p.captions.values())  # greedy: one caption per cluster


def test_sampling_is_the_same_at_any_batch_size_and_order(sampling, config, images):
    full = sampling(images)
    assert all(len(c) == 2 for p in full for c in p.captions.values())  # n_passes sampled captions per cluster
    assert_same(full, run_in_batches(sampling, images, 1))
    assert_same(full, run_in_batches(sampling, images, 2))
    order = [3, 0, 4, 2, 1]
    shuffled = sampling([images[i] for i in order])
    assert_same([full[i] for i in order], shuffled)
    other = build(config, seed=1)(images)
    assert [p.captions for p in other] != [p.captions for p in full]


def test_sampling_honours_top_p(config, greedy, images):
    """A top-p so small that only the most likely token survives turns sampling into greedy decoding."""
    nucleus = build(config, caption={"top_p": 1e-6})
    sampled, greedy_out = nucleus(images[:2]), greedy(images[:2])
    for s, g in zip(sampled, greedy_out, strict=True):
        assert {k: [v[0], v[0]] for k, v in g.captions.items()} == s.captions


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (0, 1.0, [0.5, 0.3, 0.15, 0.05]),  # the softmax itself
        (0, 0.7, [0.625, 0.375, 0.0, 0.0]),  # nucleus: 0.5 < 0.7, 0.5 + 0.3 >= 0.7 -> two tokens, renormalised
        (3, 1.0, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),
        (1, 1.0, [1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_gumbel_sampler_follows_the_filtered_softmax(top_k, top_p, expected):
    """Per-row Gumbel-max sampling: frequencies over 4000 rows follow the top-k / top-p filtered softmax."""
    probs, rows = torch.tensor([0.5, 0.3, 0.15, 0.05]), 4000
    scores = probs.log()[[1, 0, 3, 2]].expand(rows, -1)  # not in order: the sampler finds the candidates itself

    def sample():
        sampler = GumbelSampler([torch.Generator().manual_seed(i) for i in range(rows)], top_k, top_p)
        out = sampler(None, scores)
        assert torch.equal(torch.isfinite(out).sum(-1), torch.ones(rows, dtype=torch.long))  # exactly one token
        return out.argmax(-1)

    picks = sample()
    freq = torch.bincount(picks, minlength=4).float()[[1, 0, 3, 2]] / rows
    assert torch.allclose(freq, torch.tensor(expected), atol=0.025), freq
    assert torch.equal(sample(), picks)  # seeded per row


def test_local_reruns_are_one_padded_call_equal_to_unpadded_reruns(greedy, images, monkeypatch):
    cap = greedy.captioner
    rng = np.random.default_rng(1)
    with torch.inference_mode():
        tokens = cap.encode(images, (64,))[0]
        maps = [torch.as_tensor(rng.integers(0, 2 + i, tokens.grid)) for i in range(len(images))]
        calls = []
        run = cap.run_encoder
        monkeypatch.setattr(cap, "run_encoder", lambda *a, **k: calls.append(a[0].shape) or run(*a, **k))
        states = cap.batch_cluster_states(tokens, maps, "concat")
        assert len(calls) == 1 and calls[0][0] == sum(2 + i for i in range(len(images)))  # one call, every cluster
        vision = cap.model.vision_model
        for b, cmap in enumerate(maps):
            flat = cmap.flatten()
            assert len(states[b]) == int(flat.max()) + 1
            for k, got in enumerate(states[b]):
                idx = (flat == k).nonzero()[:, 0]
                emb = tokens.embeddings[b]
                alone = torch.cat([emb[:1], emb[1:][idx]])[None]  # CLS + the cluster's patches, no padding
                local = vision.post_layernorm(vision.encoder(inputs_embeds=alone).last_hidden_state)[0]
                assert got.shape == (1 + 2 * len(idx), tokens.patches.shape[-1])
                torch.testing.assert_close(got[: 1 + len(idx)], local, rtol=1e-5, atol=1e-5)
                assert torch.equal(got[1 + len(idx) :], tokens.patches[b][idx])


def test_one_encoder_call_for_local_reruns_and_one_decoding_loop_per_batch(sampling, images, monkeypatch):
    cap = sampling.captioner
    encoder_calls, decoder_calls = [], []
    run = cap.run_encoder
    monkeypatch.setattr(cap, "run_encoder", lambda *a, **k: encoder_calls.append(k) or run(*a, **k))
    hook = cap.model.text_decoder.register_forward_pre_hook(
        lambda mod, args, kw: decoder_calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        preds = sampling.predict(images)  # one batch
    finally:
        hook.remove()
    n_clusters = sum(len(p.captions) for p in preds)
    assert len(encoder_calls) == len(sampling.scales) + 1  # one per scale, one for every local re-run of the batch
    prefills = [shape for shape in decoder_calls if shape[1] > 1]  # the prompt: once, for every cluster and pass
    assert prefills == [(n_clusters * sampling.caption_config.n_passes, prefills[0][1])]
    assert all(shape[1] == 1 for shape in decoder_calls[1:])  # then one token per step
    assert set(sampling.last_stage_seconds) == set(STAGES)
    assert all(s >= 0 for s in sampling.last_stage_seconds.values())
    assert all(sampling.stage_seconds[s] >= sampling.last_stage_seconds[s] for s in STAGES)


def first_cluster_ranks(pred) -> list[int]:
    """For each vocabulary name, the area rank (0 = largest) of the first cluster whose captions gave it."""
    areas = np.bincount(pred.cluster_map.ravel())
    order = np.argsort(-areas, kind="stable")
    nouns = pred.extra["cluster_nouns"]
    return [next(r for r, k in enumerate(order) if name in nouns[str(k)]) for name in pred.vocabulary]


def test_max_names_keeps_the_names_of_the_largest_clusters(config, sampling, images):
    full = sampling(images)
    capped = build(config, max_names=2)(images)
    assert any(len(p.vocabulary) > 2 for p in full)
    for f, c in zip(full, capped, strict=True):
        assert c.vocabulary == f.vocabulary[:2]
        ranks = first_cluster_ranks(f)
        assert ranks == sorted(ranks)  # names of bigger clusters come first
        assert c.label_map.max() <= len(c.vocabulary)


def test_max_names_setting_and_flag():
    assert load_config(None, {"max_names": 3}).max_names == 3
    with pytest.raises(ConfigError, match=r"max_names: expected an integer >= 1 or null, got 0"):
        load_config(None, {"max_names": 0})
    args = build_parser().parse_args(["x.png", "-o", "out", "--max-names", "7"])
    assert overrides_from_args(args)["max_names"] == 7
    assert "max_names" not in overrides_from_args(build_parser().parse_args(["x.png", "-o", "out"]))


def test_compile_flag_gives_the_same_outputs(config, greedy, images, monkeypatch):
    """``compile: true`` wraps the encoder in torch.compile (traced here with the eager backend: inductor's C++
    code generation takes about a minute on two CPU cores)."""
    real, compiled = torch.compile, []

    def eager_compile(fn, **kwargs):
        compiled.append(fn)
        return real(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    pipeline = build(config, caption={"sample": False}, compile=True)
    assert len(compiled) == 1
    assert_same(pipeline(images[:2]), greedy(images[:2]))


def random_features(b=3, n=64, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g) * 3
    member = torch.randint(0, 4, (b, n), generator=g)
    return centres.gather(1, member[..., None].expand(-1, -1, d)) + torch.randn(b, n, d, generator=g)


def test_batched_kmeans_equals_per_image_kmeans():
    x, ks, restarts = random_features(), [2, 3, 5, 1], 3
    draws = [kmeans_draws(x.shape[1], k, restarts, torch.Generator().manual_seed(10 + k)) for k in ks]
    first = torch.stack([f for f, _ in draws])
    uniforms = torch.zeros(len(ks), restarts, max(ks) - 1)
    for q, (_, u) in enumerate(draws):
        uniforms[q, :, : u.shape[1]] = u
    labels, centres, inertia = batched_kmeans(x, ks, first, uniforms, max_iter=50)
    assert labels.shape == (3, 4, 64) and centres.shape == (3, 4, 5, 12) and inertia.shape == (3, 4, 3)
    for b in range(x.shape[0]):
        for q, k in enumerate(ks):
            alone, alone_centres = kmeans(x[b], k, restarts, 50, torch.Generator().manual_seed(10 + k))
            assert torch.equal(labels[b, q], alone)
            torch.testing.assert_close(centres[b, q, :k], alone_centres)
            assert labels[b, q].max() < k


def test_bboost_batch_equals_one_image_at_a_time():
    grids = [(6, 6), (8, 8)]
    tokens = [random_features(b=4, n=g[0] * g[1], d=16, seed=i) for i, g in enumerate(grids)]
    bboost = BBoost(BBoostConfig(k_min=2, k_max=5, n_init=3, max_iter=30, pos_dim=8))
    batched = bboost.batch(tokens, grids, seed=7)
    for b, got in enumerate(batched):
        assert torch.equal(got, bboost([t[b] for t in tokens], grids, seed=7))
        assert got.shape == (8, 8)
    assert torch.equal(bboost.batch([t[[2, 0]] for t in tokens], grids, seed=7)[0], batched[2])  # any order


def test_small_calls_and_beam_search_caption_alike(greedy, images):
    """A set captioned alone (a call padded with dummy rows) reads the same as in a bigger call; beam search runs."""
    cap = greedy.captioner
    with torch.inference_mode():
        tokens = cap.encode(images[:2], (64,))[0]
        maps = [(torch.arange(64).reshape(8, 8) % 8 >= 3).long(), (torch.arange(64).reshape(8, 8) >= 20).long()]
        states = [s for per_image in cap.batch_cluster_states(tokens, maps, "concat") for s in per_image]
        cfg = CaptionConfig(n_passes=2, max_new_tokens=6, min_new_tokens=2)
        together = cap.caption(states, cfg, seed=3, keys=[0, 1, 0, 1])
        alone = [cap.caption([s], cfg, seed=3, keys=[k])[0] for s, k in zip(states, [0, 1, 0, 1], strict=True)]
        beams = cap.caption(states, CaptionConfig(sample=False, num_beams=2, max_new_tokens=6))
    assert together == alone
    assert [len(c) for c in beams] == [1, 1, 1, 1] and all(c[0] for c in beams)


def test_cross_attention_ignores_padding(greedy):
    """transformers v5 BLIP drops the cross-attention mask; BlipCaptioner hands it back, so a padded set decodes
    exactly as it does alone."""
    cap = greedy.captioner
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(5, cap.hidden_size, generator=g), torch.randn(23, cap.hidden_size, generator=g)
    padded = torch.zeros(2, 23, cap.hidden_size)
    padded[0, :5], padded[1] = short, long
    mask = torch.tensor([[1] * 5 + [0] * 18, [1] * 23])
    ids = cap.prompt_ids("a picture of")[None]
    with torch.inference_mode():
        decoder = cap.model.text_decoder
        both = decoder(input_ids=ids.expand(2, -1), encoder_hidden_states=padded, encoder_attention_mask=mask).logits
        alone = decoder(input_ids=ids, encoder_hidden_states=short[None], encoder_attention_mask=mask[:1, :5]).logits
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_padding", [True, False])
def test_shared_cross_attention_decodes_as_transformers_cache(greedy, images, mask_padding):
    """Keys/values stored once per set in length buckets, read by all of the set's rows, decode token for token as
    transformers' own generate with its per-row cache on the same padded states (mask_padding False: the padding
    is attended, as the demo BLIP was trained)."""
    cap = greedy.captioner
    with torch.inference_mode():
        tokens = cap.encode(images[:2], (64,))[0]
        maps = [(torch.arange(64).reshape(8, 8) % 8 >= 3).long(), (torch.arange(64).reshape(8, 8) >= 20).long()]
        states = [s for per_image in cap.batch_cluster_states(tokens, maps, "concat") for s in per_image]
        assert len({bucket_length(s.shape[0]) for s in states}) > 1  # several buckets
        cfg = CaptionConfig(sample=False, max_new_tokens=8, min_new_tokens=2, mask_padding=mask_padding)
        ours = cap.caption(states, cfg)
        length = max(s.shape[0] for s in states)
        padded = torch.zeros(len(states), length, cap.hidden_size)
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for k, s in enumerate(states):
            padded[k, : s.shape[0]], mask[k, : s.shape[0]] = s, 1
        prompt = cap.prompt_ids(cfg.prompt)[None].expand(len(states), -1)
        text_cfg = cap.model.config.text_config
        out = cap.model.text_decoder.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            encoder_hidden_states=padded,
            encoder_attention_mask=mask if mask_padding else torch.ones_like(mask),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=2,
            eos_token_id=text_cfg.sep_token_id,
            pad_token_id=text_cfg.pad_token_id,
        )
    texts = cap.processor.tokenizer.batch_decode(out[:, prompt.shape[1] :], skip_special_tokens=True)
    assert ours == [[t.strip().lower()] for t in texts]


def test_bucket_lengths_pad_at_most_a_quarter_and_depend_on_the_length_alone():
    for n in range(1, 3000):
        b = bucket_length(n)
        assert b % MIN_BUCKET == 0 and 0 <= b - n < max(MIN_BUCKET, n / 4)
    assert [bucket_length(n) for n in (1, 16, 17, 100, 600)] == [16, 16, 32, 112, 640]
