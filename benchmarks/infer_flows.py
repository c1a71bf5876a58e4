"""The three inference flows that ``bench_infer.py`` times, on one loaded :class:`AutoSegPipeline` (same models, same
settings). Each returns one :class:`Output` per image and adds its stage times to ``pipe.stage_seconds`` under the
pipeline's own stage names (encode, bboost, cluster_states, caption, nouns, segment).

- :func:`run_original`: the released AutoSeg code's order of work, one image at a time.
- :func:`run_hf_batched`: what a user would write with plain transformers and ordinary batching.
- :func:`run_ours`: :meth:`AutoSegPipeline.predict` on batches.

:data:`LOGITS` and :func:`ours_logits` recompute each flow's segmenter logits, outside the timing, for the identity
check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from autoseg.models.blip import BlipCaptioner, CaptionConfig, ScaleTokens
from autoseg.models.blip_decoding import HF_DEFAULT_TOP_K, GumbelSampler, row_seed
from autoseg.models.segmenters.base import labels_from_logits, pair_chunks
from autoseg.models.segmenters.clipseg import CLIPSegSegmenter
from autoseg.pipeline import AutoSegPipeline, caption_clusters, cluster_order
from autoseg.vocab.bboost import (
    batched_kmeans,
    dense_crf,
    kmeans_draws,
    majority_filter,
    relabel_consecutive,
    resize_labels,
    soft_labels,
)


class Output(NamedTuple):
    """One image's result: its names and its ``H x W`` label map (0 = unlabelled, ``i`` = the ``i``-th name)."""

    vocabulary: list[str]
    label_map: np.ndarray


Flow = Callable[[AutoSegPipeline, Sequence[Image.Image], int], list[Output]]


# ---------------------------------------------------------------------------------------------------------------------
# Decoding shared by the flows and the [SEP] calibration: AutoSeg's sampling (per-row seeded Gumbel-max), stock cache


def decoding_kwargs(decoder: torch.nn.Module, cfg: CaptionConfig, seeds: Sequence[int]) -> dict:
    """``generate`` arguments for BLIP's text decoder: the caption settings and, when sampling, one generator per row
    (seeded by ``seeds``) in a :class:`GumbelSampler`, as AutoSeg's captioner samples (temperature, top-k, top-p)."""
    text_cfg = decoder.config
    kwargs = dict(
        do_sample=False,  # sampling is the Gumbel-max processor's, with one generator per row
        num_beams=1 if cfg.sample else cfg.num_beams,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        eos_token_id=text_cfg.sep_token_id,
        pad_token_id=text_cfg.pad_token_id,
    )
    if cfg.sample:
        device = next(decoder.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        top_k = decoder.generation_config.top_k
        top_k = HF_DEFAULT_TOP_K if top_k is None else top_k
        warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
        kwargs["logits_processor"] = LogitsProcessorList([*warpers, GumbelSampler(gens, top_k, cfg.top_p)])
    return kwargs


def new_token_counts(sequences: torch.Tensor, prompt_length: int, sep_id: int) -> torch.Tensor:
    """Tokens each row of a ``generate`` output decoded after the prompt, its closing ``[SEP]`` included (rows that
    never close count every step). Returns ``R`` longs."""
    new = sequences[:, prompt_length:]
    is_sep = new == sep_id
    return torch.where(is_sep.any(1), is_sep.int().argmax(1) + 1, new.shape[1])


class GenerateRecorder:
    """While active, records every caption decoding call: the stock ``decoder.generate`` (original and hf_batched)
    and AutoSeg's :func:`autoseg.models.blip_decoding.decode` (ours): new tokens per caption, calls, and the
    row-steps decoded (the rows of every decoder forward: the decoding work, steps spent on rows already closed
    included, which ``generate`` spends and ``decode`` drops)."""

    def __init__(self, decoder: torch.nn.Module):
        self.decoder = decoder
        self.sep_id = decoder.config.sep_token_id
        self.tokens: list[int] = []
        self.row_steps = 0
        self.calls = 0

    def __enter__(self) -> GenerateRecorder:
        from autoseg.models import blip as blip_module

        original, original_decode = self.decoder.generate, blip_module.decode

        def generate(*args, **kwargs):
            out = original(*args, **kwargs)
            self.tokens += new_token_counts(out, kwargs["input_ids"].shape[1], self.sep_id).tolist()
            self.calls += 1
            return out

        def decode(decoder, prompt, *args, **kwargs):
            out = original_decode(decoder, prompt, *args, **kwargs)
            live = args[7] if len(args) > 7 else kwargs.get("live")  # dummy rows are not captions
            counts = new_token_counts(out, prompt.numel(), self.sep_id)
            self.tokens += (counts if live is None else counts[live]).tolist()
            self.calls += 1
            return out

        def count_rows(module, args, kwargs):
            self.row_steps += kwargs["input_ids"].shape[0]

        self.decoder.generate = generate  # an instance attribute: the class's method comes back on exit
        blip_module.decode = decode
        self._restore = (blip_module, original_decode)
        self._hook = self.decoder.register_forward_pre_hook(count_rows, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        del self.decoder.generate
        module, original_decode = self._restore
        module.decode = original_decode
        self._hook.remove()


# ---------------------------------------------------------------------------------------------------------------------
# The segmenter step of the released code (X-Decoder: each image encoded once) and of the plain-transformers flow


def clip_image_features(seg: CLIPSegSegmenter, image: Image.Image) -> list[torch.Tensor]:
    """One CLIP vision forward of one image: the activations CLIPSeg's decoder reads (as its stock forward takes
    them), each ``1 x (1 + N) x D``."""
    vision = seg.model.clip.vision_model(
        pixel_values=seg.preprocess([image]), output_hidden_states=True, interpolate_pos_encoding=True
    )
    return [vision.hidden_states[i + 1] for i in seg.model.extract_layers]


def clip_decode(seg: CLIPSegSegmenter, features: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    """CLIPSeg's decoder on one image's activations for every name at once: ``C x h x w`` logits."""
    c = text.shape[0]
    logits = seg.model.decoder([a.expand(c, -1, -1) for a in features], text).logits
    return logits.view(c, *logits.shape[-2:])


def image_once_logits(seg: CLIPSegSegmenter, image: Image.Image, names: Sequence[str]) -> torch.Tensor:
    """The segmenter step of original and hf_batched on one image: the image encoded once (as the released
    X-Decoder does), each name's text embedding computed for this image by stock ``get_text_features`` on its full
    prompts, averaged over the templates, one call per name (CLIP's zero-shot recipe; no prefix sharing, no cache
    across images), the decoder for every name at once. Returns ``C x h x w``.

    One call over all of an image's prompts pads each to the longest: measured at one thread on this project's CPU
    (16 names x 12 templates, 14 tokens on average, 21 at most) it was 5-10% slower, so hf_batched keeps one call per
    name (a baseline step is never slower than the original's)."""
    clip = seg.model.clip
    text = [
        clip.get_text_features(**seg.tokenize([t.format(n) for t in seg.templates])).pooler_output.mean(0)
        for n in names
    ]
    return clip_decode(seg, clip_image_features(seg, image), torch.stack(text))


def segment_once(seg: CLIPSegSegmenter, image: Image.Image, names: Sequence[str]) -> np.ndarray:
    """One image's label map from :func:`image_once_logits` (no names: all unlabelled), as the segmenter makes it."""
    if not names:
        return np.zeros((image.height, image.width), np.int32)
    size = (image.height, image.width)
    return labels_from_logits(image_once_logits(seg, image, names), size, seg.threshold, seg.class_chunk)


@torch.inference_mode()
def ours_logits(
    pipe: AutoSegPipeline, images: Sequence[Image.Image], vocabularies: Sequence[Sequence[str]], bs: int
) -> list[torch.Tensor | None]:
    """Our segmenter's logits of every image, batched and cached as a timed run of ours computes them (the cache
    cleared first): per image ``C x h x w`` (None for an image without names)."""
    seg = pipe.segmenter
    seg.clear_cache()
    out: list[torch.Tensor | None] = []
    for start in range(0, len(images), bs):
        batch, vocabs = images[start : start + bs], vocabularies[start : start + bs]
        todo, names, features, text = seg.encode_batch(batch, vocabs)
        logits = [
            seg.decode_pairs(features, text, i, n) for i, n, _ in pair_chunks(vocabs, todo, names, seg.pair_chunk)
        ]
        flat, pos, found = (torch.cat(logits) if logits else None), 0, {}
        for b in todo:
            found[b] = flat[pos : pos + len(vocabs[b])]
            pos += len(vocabs[b])
        out += [found.get(b) for b in range(len(batch))]
    seg.clear_cache()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# original: the released code's order of work, one image at a time, built from AutoSeg's modules


def original_clusters(pipe: AutoSegPipeline, tokens: list[ScaleTokens]) -> torch.Tensor:
    """BBoost with one k-means call per scale and k (the same seeds as ours), then alignment, CRF, majority filter."""
    cfg = pipe.bboost.config
    target = max((t.grid for t in tokens), key=lambda g: g[0] * g[1])
    maps = []
    for scale_idx, t in enumerate(tokens):
        feats = pipe.bboost.features(t.patches, t.grid)  # 1 x N x D'
        n = feats.shape[1]
        for k in range(cfg.k_min, cfg.k_max + 1):
            gen = torch.Generator(device=feats.device).manual_seed(pipe.seed * 1000 + scale_idx * 100 + k)
            first, uniforms = kmeans_draws(n, min(k, n), cfg.n_init, gen, feats.device)
            labels, _, _ = batched_kmeans(feats, [min(k, n)], first[None], uniforms[None], cfg.max_iter)
            maps.append(resize_labels(labels[0, 0].reshape(t.grid), target))
    probs = soft_labels(maps)
    if cfg.crf_iters > 0:
        probs = dense_crf(probs, cfg.crf_weight, cfg.crf_theta, cfg.crf_iters)
    return relabel_consecutive(majority_filter(probs.argmax(0), cfg.majority_max_passes))


def original_states(pipe: AutoSegPipeline, t: ScaleTokens, cap_map: torch.Tensor) -> list[torch.Tensor]:
    """Per cluster, one encoder forward on CLS + its patch embeddings, then its global patch tokens (``concat``)."""
    cap, flat, emb = pipe.captioner, cap_map.flatten(), t.embeddings[0]
    states = []
    for k in range(int(flat.max()) + 1):
        idx = (flat == k).nonzero()[:, 0]
        seq = torch.cat([emb[:1], emb[1:][idx]])[None]  # 1 x (1 + n_k) x D
        local = stock_layers(cap, seq)[0]
        states.append(torch.cat([local, t.patches[0][idx]]))
    return states


def original_caption(pipe: AutoSegPipeline, state: torch.Tensor, key: int, sample: int) -> str:
    """One stock ``generate`` call for one caption (pass ``sample`` of cluster ``key``), as the original loops."""
    cap, cfg = pipe.captioner, pipe.caption_config
    decoder = cap.model.text_decoder
    prompt = cap.prompt_ids(cfg.prompt)[None]
    with cap.autocast_context():
        out = decoder.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            encoder_hidden_states=state[None],
            encoder_attention_mask=torch.ones(1, state.shape[0], dtype=torch.long, device=state.device),
            **decoding_kwargs(decoder, cfg, [row_seed(pipe.seed, key, sample)]),
        )
    return cap.processor.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip().lower()


@torch.inference_mode()
def original_image(pipe: AutoSegPipeline, image: Image.Image) -> Output:
    """The whole original flow for one image."""
    with pipe.timed("encode"):
        tokens = [hf_encode(pipe.captioner, [image], size) for size in pipe.scales]  # each scale on its own
    cap_tokens = tokens[pipe.caption_index]
    with pipe.timed("bboost"):
        cap_map = caption_clusters(original_clusters(pipe, tokens), cap_tokens.grid)
    with pipe.timed("cluster_states"):
        states = original_states(pipe, cap_tokens, cap_map)
    n_pass = pipe.caption_config.n_passes if pipe.caption_config.sample else 1
    with pipe.timed("caption"):
        captions = [[original_caption(pipe, st, k, p) for p in range(n_pass)] for k, st in enumerate(states)]
    with pipe.timed("nouns"):
        order = cluster_order(cap_map, len(captions))
        nouns = [[pipe.nouns.nouns_per_caption([c])[0] for c in captions[k]] for k in order]  # one caption a call
    vocabulary = pipe.prediction(image, cap_map, captions, order, nouns).vocabulary
    with pipe.timed("segment"):
        label_map = segment_once(pipe.segmenter, image, vocabulary)
    return Output(vocabulary, label_map)


def run_original(pipe: AutoSegPipeline, images: Sequence[Image.Image], batch_size: int = 1) -> list[Output]:
    """The original flow on every image, one at a time (``batch_size`` is not used)."""
    check_flow_settings(pipe)
    return [original_image(pipe, image) for image in images]


# ---------------------------------------------------------------------------------------------------------------------
# hf_batched: plain transformers with ordinary batching


def stock_layers(cap: BlipCaptioner, emb: torch.Tensor) -> torch.Tensor:
    """transformers' own BLIP encoder layers (its ``BlipAttention``: scores, softmax, product) and final layer norm
    on unpadded ``B x L x D`` embeddings, what the released code and a plain-transformers user run."""
    vision = cap.model.vision_model
    with cap.autocast_context():
        return vision.post_layernorm(vision.encoder(inputs_embeds=emb).last_hidden_state)


def hf_encode(cap: BlipCaptioner, images: Sequence[Image.Image], size: int) -> ScaleTokens:
    """BLIP's vision tower on a batch at one scale with transformers' own modules (embeddings, encoder, final layer
    norm); the embeddings are kept for the cluster re-runs."""
    vision = cap.model.vision_model
    size_arg = {"height": size, "width": size}
    pixels = cap.processor.image_processor(list(images), size=size_arg, return_tensors="pt")["pixel_values"]
    with cap.autocast_context():
        emb = vision.embeddings(pixels.to(device=cap.device, dtype=cap.dtype), interpolate_pos_encoding=True)
    hidden = stock_layers(cap, emb)
    grid = (size // cap.patch_size, size // cap.patch_size)
    return ScaleTokens(size, grid, hidden[:, 0], hidden[:, 1:], emb)


def hf_states(cap: BlipCaptioner, t: ScaleTokens, b: int, cap_map: torch.Tensor) -> list[torch.Tensor]:
    """``concat`` states of every cluster of image ``b``: the local re-runs of all its clusters in one padded,
    masked encoder call (transformers' ``BlipEncoder`` takes no mask, so AutoSeg's masked ``run_encoder``), then
    each cluster's global patch tokens."""
    flat, emb = cap_map.flatten(), t.embeddings[b]
    idx = [(flat == k).nonzero()[:, 0] for k in range(int(flat.max()) + 1)]
    lengths = torch.tensor([1 + len(i) for i in idx], device=emb.device)
    padded = emb.new_zeros(len(idx), int(lengths.max()), emb.shape[-1])
    for k, i in enumerate(idx):
        padded[k, 0] = emb[0]
        padded[k, 1 : 1 + len(i)] = emb[1 + i]
    local = cap.run_encoder(padded, lengths)
    return [torch.cat([local[k, : 1 + len(i)], t.patches[b][i]]) for k, i in enumerate(idx)]


def hf_captions(pipe: AutoSegPipeline, states: list[torch.Tensor]) -> list[list[str]]:
    """One stock ``generate`` for every cluster and pass of one image: states padded to the longest with an encoder
    attention mask, transformers' own cache, the same per-row seeded sampler as ours. Returns per cluster, its
    captions."""
    cap, cfg = pipe.captioner, pipe.caption_config
    decoder = cap.model.text_decoder
    n_pass = cfg.n_passes if cfg.sample else 1
    length = max(st.shape[0] for st in states)
    enc = states[0].new_zeros(len(states), length, states[0].shape[-1])
    mask = torch.zeros(len(states), length, dtype=torch.long, device=enc.device)
    for k, st in enumerate(states):
        enc[k, : st.shape[0]], mask[k, : st.shape[0]] = st, 1
    prompt = cap.prompt_ids(cfg.prompt)
    input_ids = prompt[None].expand(len(states) * n_pass, -1)
    seeds = [row_seed(pipe.seed, k, p) for k in range(len(states)) for p in range(n_pass)]
    with cap.autocast_context():
        out = decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=enc.repeat_interleave(n_pass, 0),
            encoder_attention_mask=mask.repeat_interleave(n_pass, 0),
            **decoding_kwargs(decoder, cfg, seeds),
        )
    texts = [
        t.strip().lower()
        for t in cap.processor.tokenizer.batch_decode(out[:, prompt.numel() :], skip_special_tokens=True)
    ]
    return [texts[k * n_pass : (k + 1) * n_pass] for k in range(len(states))]


@torch.inference_mode()
def hf_batch(pipe: AutoSegPipeline, images: Sequence[Image.Image]) -> list[Output]:
    """One batch: the vision tower once per scale for the batch and AutoSeg's BBoost on it, then per image its
    cluster re-runs, one ``generate``, one spaCy call and the segmenter step (:func:`image_once_logits`)."""
    cap = pipe.captioner
    with pipe.timed("encode"):
        tokens = [hf_encode(cap, images, size) for size in pipe.scales]
    t = tokens[pipe.caption_index]
    with pipe.timed("bboost"):
        maps = pipe.bboost.batch([s.patches for s in tokens], [s.grid for s in tokens], seed=pipe.seed)
        cap_maps = [caption_clusters(m, t.grid) for m in maps]
    out = []
    for b, (image, cap_map) in enumerate(zip(images, cap_maps, strict=True)):
        with pipe.timed("cluster_states"):
            states = hf_states(cap, t, b, cap_map)
        with pipe.timed("caption"):
            captions = hf_captions(pipe, states)
        with pipe.timed("nouns"):
            order = cluster_order(cap_map, len(captions))
            nouns = pipe.nouns.nouns_per_group([captions[k] for k in order])  # one spaCy call per image
        vocabulary = pipe.prediction(image, cap_map, captions, order, nouns).vocabulary
        with pipe.timed("segment"):
            label_map = segment_once(pipe.segmenter, image, vocabulary)
        out.append(Output(vocabulary, label_map))
    return out


def run_hf_batched(pipe: AutoSegPipeline, images: Sequence[Image.Image], batch_size: int) -> list[Output]:
    """The plain-transformers flow on every image, ``batch_size`` images per vision-tower call."""
    check_flow_settings(pipe)
    return [o for s in range(0, len(images), batch_size) for o in hf_batch(pipe, images[s : s + batch_size])]


# ---------------------------------------------------------------------------------------------------------------------


def run_ours(pipe: AutoSegPipeline, images: Sequence[Image.Image], batch_size: int) -> list[Output]:
    """AutoSeg's pipeline, ``batch_size`` images per :meth:`AutoSegPipeline.predict` call."""
    preds = [p for s in range(0, len(images), batch_size) for p in pipe.predict(images[s : s + batch_size])]
    return [Output(p.vocabulary, p.label_map) for p in preds]


def check_flow_settings(pipe: AutoSegPipeline) -> None:
    """The re-implemented flows cover the default pipeline: ``concat`` captions, no enhancer, CLIPSeg."""
    if pipe.caption_config.mode != "concat" or pipe.enhancer is not None:
        raise ValueError("the original and hf_batched flows re-implement concat captions without an enhancer")
    if not isinstance(pipe.segmenter, CLIPSegSegmenter):
        raise ValueError("the original and hf_batched flows re-implement the CLIPSeg segmenter")


FLOWS: dict[str, Flow] = {"original": run_original, "hf_batched": run_hf_batched, "ours": run_ours}
LOGITS = {"original": image_once_logits, "hf_batched": image_once_logits}
