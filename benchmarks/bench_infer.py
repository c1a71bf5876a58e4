"""Inference throughput: AutoSeg's batched pipeline against a faithful re-implementation of the original's flow.

    python benchmarks/bench_infer.py [--images 8] [--device cpu|cuda] [--blip base|large] [--json out.json]

Both run in this process on the same images, with the same models (random weights at BLIP-base or BLIP-large and
CLIPSeg-rd64 sizes, saved and loaded through AutoSeg's loaders), the same default pipeline settings (scales 384 and
512, k = 2..8, 5 sampled captions per cluster) and the same vocabulary cap (``max_names`` 16):

- **naive** (the released code's flow, built from our modules): one image at a time; every scale encoded on its own;
  k-means run separately for every k; the encoder re-run once per cluster; one ``generate`` call per cluster per
  caption pass; spaCy on one caption at a time; CLIPSeg's stock forward with the image repeated per name (as its model
  card shows; text embeddings averaged over the same prompt templates).
- **ours**: :class:`autoseg.pipeline.AutoSegPipeline` at ``--batch-size`` (default 4).

Timing uses the sampled default captions; a separate greedy run of both on the same images checks that they give
the same vocabularies and label maps (first ``--check-images`` images): ``names_identical``; ``label_agreement`` = the
fraction of pixels labelled alike; ``differing_pixels``, and ``max_differing_gap`` = the largest gap there between the
naive flow's logits of the two labels; ``logit_noise`` = the largest difference between the two flows' logits (both
compute the same function with differently batched products, which round differently in the last bits);
``identical`` = the same names, logits that agree to float rounding (noise within ``TIE`` of their size) and label
maps that differ only at ties (gaps within twice the noise).

Reported (``--json``): ``ours_ips``, ``naive_ips``, ``speedup``, ``encoder_floor_ratio`` (our time per image over that
of the BLIP encoder forwards alone, the part no batching removes on a CPU: the full-image passes at each scale and the
re-runs on each cluster's patches, both batched as our pipeline batches them; ``encoder_floor_ratio_full_images``
counts the full-image passes only), ``peak_rss_mb``, ``stages`` (our seconds per image per stage) and ``identical``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import (  # noqa: E402
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    ViTImageProcessor,
)

from autoseg.api import build_pipeline  # noqa: E402
from autoseg.config import PipelineConfig  # noqa: E402
from autoseg.models.blip_decoding import HF_DEFAULT_TOP_K, GumbelSampler, row_seed  # noqa: E402
from autoseg.models.scratch import (  # noqa: E402
    CLIP_MEAN,
    CLIP_STD,
    bert_uncased_vocab_dir,
    blip_tokenizer,
    clip_tokenizer,
)
from autoseg.models.segmenters import SegmenterConfig  # noqa: E402
from autoseg.models.segmenters.base import labels_from_logits  # noqa: E402
from autoseg.pipeline import AutoSegPipeline, caption_clusters, cluster_order  # noqa: E402
from autoseg.vocab.bboost import (  # noqa: E402
    batched_kmeans,
    dense_crf,
    kmeans_draws,
    majority_filter,
    relabel_consecutive,
    resize_labels,
    soft_labels,
)

TIE = 1e-5  # the two flows' logits may differ by this much relative to their size (about 100 float32 ulps)
BLIP_SIZES = {  # vision tower; the text decoder is BERT-base in both
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),  # quick checks
}


def save_models(root: Path, blip: str) -> tuple[Path, Path]:
    """Random BLIP (``blip`` size) and CLIPSeg-rd64-refined (ViT-B/16) models, saved with ``save_pretrained``."""
    torch.manual_seed(0)
    tok = blip_tokenizer()
    vision = dict(**BLIP_SIZES[blip], patch_size=16, image_size=384, initializer_range=0.02)
    text = dict(vocab_size=len(tok), encoder_hidden_size=vision["hidden_size"], bos_token_id=tok.bos_token_id)
    text |= dict(pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text, initializer_range=0.02))
    size = {"height": 384, "width": 384}
    processor = BlipProcessor(BlipImageProcessor(size=size, image_mean=CLIP_MEAN, image_std=CLIP_STD), tok)
    model.save_pretrained(root / "blip")
    processor.save_pretrained(root / "blip")
    ctok = clip_tokenizer(english_words())  # whole English words are one token each, as with CLIP's own BPE
    config = CLIPSegConfig(
        vision_config=dict(patch_size=16, image_size=224),  # CLIPSeg rd64: CLIP ViT-B/16, reduce_dim 64
        text_config=dict(vocab_size=len(ctok), bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id),
        use_complex_transposed_convolution=True,  # the "refined" decoder
    )
    seg = CLIPSegForImageSegmentation(config)
    image_processor = ViTImageProcessor(size={"height": 352, "width": 352}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    seg.save_pretrained(root / "clipseg")
    CLIPSegProcessor(image_processor=image_processor, tokenizer=ctok).save_pretrained(root / "clipseg")
    return root / "blip", root / "clipseg"


def english_words() -> list[str]:
    """BERT-base-uncased's whole words (the names BLIP's tokenizer produces), for a CLIP BPE of realistic lengths."""
    vocab = (bert_uncased_vocab_dir() / "vocab.txt").read_text(encoding="utf-8").split()
    return [w for w in vocab if w.isalpha() and w.isascii()]


def photos(n: int) -> list[Image.Image]:
    """``n`` photographs of several sizes (scikit-image's sample data)."""
    from skimage import data

    pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(), data.cat()]
    sizes = [(640, 480), (500, 375), (480, 640), (512, 512)]
    return [Image.fromarray(pool[i % len(pool)]).convert("RGB").resize(sizes[i % len(sizes)]) for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# The naive flow: the released code's order of work, one image at a time, built from AutoSeg's modules


def naive_clusters(pipe: AutoSegPipeline, tokens) -> torch.Tensor:
    """BBoost with one k-means call per scale and k (same seeds as ours), then alignment, CRF and majority filter."""
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


def naive_states(pipe: AutoSegPipeline, t, cap_map: torch.Tensor) -> list[torch.Tensor]:
    """Per cluster, one encoder forward on CLS + its patch embeddings; ``concat`` mode (the default)."""
    cap, flat, emb = pipe.captioner, cap_map.flatten(), t.embeddings[0]
    assert pipe.caption_config.mode == "concat", "the naive flow re-implements the default caption mode"
    states = []
    for k in range(int(flat.max()) + 1):
        idx = (flat == k).nonzero()[:, 0]
        seq = torch.cat([emb[:1], emb[1:][idx]])[None]  # 1 x (1 + n_k) x D
        local = cap.run_encoder(seq, torch.tensor([seq.shape[1]], device=seq.device))[0]
        states.append(torch.cat([local, t.patches[0][idx]]))
    return states


def naive_caption(pipe: AutoSegPipeline, state: torch.Tensor, key: int, sample: int) -> str:
    """One ``generate`` call for one caption (the pass ``sample`` of cluster ``key``), as the original loops."""
    cap, cfg = pipe.captioner, pipe.caption_config
    text_cfg = cap.model.config.text_config
    prompt = cap.prompt_ids(cfg.prompt)[None]
    kwargs = dict(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, do_sample=False)
    kwargs |= dict(repetition_penalty=cfg.repetition_penalty, eos_token_id=text_cfg.sep_token_id)
    if cfg.sample:
        gen = torch.Generator(device=cap.device).manual_seed(row_seed(pipe.seed, key, sample))
        top_k = cap.model.text_decoder.generation_config.top_k or HF_DEFAULT_TOP_K
        warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
        kwargs["logits_processor"] = LogitsProcessorList([*warpers, GumbelSampler([gen], top_k, cfg.top_p)])
    out = cap.model.text_decoder.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        encoder_hidden_states=state[None],
        encoder_attention_mask=torch.ones(1, state.shape[0], dtype=torch.long, device=state.device),
        pad_token_id=text_cfg.pad_token_id,
        **kwargs,
    )
    return cap.processor.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip().lower()


def naive_logits(pipe: AutoSegPipeline, image: Image.Image, names: list[str]) -> torch.Tensor:
    """CLIPSeg's stock forward: the image repeated once per name, each name's template-averaged text embedding
    (``get_text_features`` on the full prompts). Returns ``C x h x w``."""
    seg = pipe.segmenter
    cond = []
    for name in names:
        prompts = seg.tokenize([t.format(name) for t in seg.templates])
        cond.append(seg.model.clip.get_text_features(**prompts).pooler_output.mean(0))
    pixel_values = seg.preprocess([image]).repeat(len(names), 1, 1, 1)
    logits = seg.model(pixel_values=pixel_values, conditional_embeddings=torch.stack(cond)).logits
    return logits.view(len(names), *logits.shape[-2:])


def naive_segment(pipe: AutoSegPipeline, image: Image.Image, names: list[str]) -> np.ndarray:
    if not names:
        return np.zeros((image.height, image.width), np.int32)
    logits = naive_logits(pipe, image, names)
    return labels_from_logits(logits, (image.height, image.width), pipe.segmenter.threshold)


@torch.inference_mode()
def float_ties(pipe: AutoSegPipeline, image: Image.Image, names: list[str], ours: np.ndarray, naive: np.ndarray):
    """Whether the label maps of one image differ only at float ties.

    Both flows compute the same logits with products batched differently, so their floats differ in the last bits.
    ``noise`` is the largest difference between the two flows' (upsampled) logits; a pixel labelled differently is a
    tie when the naive flow's logits of the two labels are within ``2 * noise`` of each other (each may move by
    ``noise``), and the flows agree when the noise is float rounding: at most ``TIE`` of the logits' size.

    Returns:
        ``(gaps, noise, scale)``: the naive logit gaps at the differing pixels, the noise, the largest |logit|.
    """
    size = (image.height, image.width)
    up = lambda logits: torch.nn.functional.interpolate(logits[None].float(), size=size, mode="bilinear")[0]  # noqa: E731
    seg = pipe.segmenter
    naive_up = up(naive_logits(pipe, image, names))  # C x H x W, as labels_from_logits upsamples them
    ours_up = up(seg.logits(seg.preprocess([image]), names)[0])
    noise, scale = float((ours_up - naive_up).abs().max()), float(naive_up.abs().max())
    where = np.nonzero(ours != naive)
    if (ours[where] == 0).any() or (naive[where] == 0).any():  # unlabelled against a name: not a tie
        return np.full(where[0].size, np.inf), noise, scale
    at = naive_up[:, torch.from_numpy(where[0]), torch.from_numpy(where[1])]  # C x D
    pick = lambda labels: at.gather(0, torch.from_numpy(labels[where] - 1).long()[None])[0]  # noqa: E731
    return (pick(naive) - pick(ours)).abs().numpy(), noise, scale


@torch.inference_mode()
def naive_image(pipe: AutoSegPipeline, image: Image.Image):
    """The whole original flow for one image; returns ``(vocabulary, label map)``."""
    tokens = [pipe.captioner.encode([image], (size,))[0] for size in pipe.scales]  # each scale on its own
    cap_tokens = tokens[pipe.caption_index]
    cap_map = caption_clusters(naive_clusters(pipe, tokens), cap_tokens.grid)
    states = naive_states(pipe, cap_tokens, cap_map)
    n_pass = pipe.caption_config.n_passes if pipe.caption_config.sample else 1
    captions = [[naive_caption(pipe, st, k, p) for p in range(n_pass)] for k, st in enumerate(states)]
    order = cluster_order(cap_map, len(captions))
    nouns = [[pipe.nouns.nouns_per_caption([c])[0] for c in captions[k]] for k in order]  # one caption at a time
    vocabulary = pipe.prediction(image, cap_map, captions, order, nouns).vocabulary
    return vocabulary, naive_segment(pipe, image, vocabulary)


# ---------------------------------------------------------------------------------------------------------------------


def encoder_floor(pipe: AutoSegPipeline, images: list[Image.Image], batch_size: int) -> tuple[float, float]:
    """Seconds of the BLIP encoder forwards our pipeline makes, batched as it batches them: the full-image passes at
    every scale, and the re-runs on each cluster's patches (their cluster maps computed outside the timing)."""
    batches = [images[s : s + batch_size] for s in range(0, len(images), batch_size)]
    full = local = 0.0
    with torch.inference_mode():
        for batch in batches:
            tokens, seconds = timed(pipe.captioner.encode, batch, pipe.scales)
            full += seconds
            cap = tokens[pipe.caption_index]
            maps = pipe.bboost.batch([t.patches for t in tokens], [t.grid for t in tokens], seed=pipe.seed)
            cap_maps = [caption_clusters(m, cap.grid) for m in maps]
            local += timed(pipe.captioner.batch_cluster_states, cap, cap_maps, pipe.caption_config.mode)[1]
    return full, local


def run_ours(pipe: AutoSegPipeline, images: list[Image.Image], batch_size: int):
    out = []
    for start in range(0, len(images), batch_size):
        out += pipe.predict(images[start : start + batch_size])
    return [(p.vocabulary, p.label_map) for p in out]


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    p.add_argument("--blip", choices=sorted(BLIP_SIZES), default="base")
    p.add_argument("--max-names", type=int, default=16)
    p.add_argument("--check-images", type=int, default=4, help="images of the greedy identity check")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    images = photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        blip_dir, seg_dir = save_models(Path(tmp), args.blip)
        config = PipelineConfig(
            blip=str(blip_dir),
            segmenter=SegmenterConfig(source=str(seg_dir)),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_names=args.max_names,
        )
        pipe = build_pipeline(config)
    run_ours(pipe, images[:1], 1)  # warm-up: first-call allocations and lazy loads (spaCy) outside the timing
    naive_image(pipe, images[0])

    pipe.stage_seconds = {}
    _, ours = timed(run_ours, pipe, images, args.batch_size)
    stages = {k: v / len(images) for k, v in pipe.stage_seconds.items()}
    _, naive = timed(lambda: [naive_image(pipe, im) for im in images])
    floor_full, floor_local = encoder_floor(pipe, images, args.batch_size)

    pipe.caption_config = dataclasses.replace(pipe.caption_config, sample=False)
    check = images[: args.check_images]
    ours_greedy = run_ours(pipe, check, args.batch_size)
    naive_greedy = [naive_image(pipe, im) for im in check]
    pairs = list(zip(ours_greedy, naive_greedy, strict=True))
    names_identical = all(a[0] == b[0] for a, b in pairs)
    agreement = float(np.mean([np.mean(a[1] == b[1]) for a, b in pairs]))
    ties = [float_ties(pipe, im, b[0], a[1], b[1]) for im, (a, b) in zip(check, pairs, strict=True) if a[0] == b[0]]
    only_ties = names_identical and all(np.all(g <= 2 * noise) and noise <= TIE * scale for g, noise, scale in ties)
    floor = floor_full + floor_local
    result = {
        "device": args.device,
        "blip": args.blip,
        "images": len(images),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "ours_ips": len(images) / ours,
        "naive_ips": len(images) / naive,
        "speedup": naive / ours,
        "encoder_floor_ratio": ours / floor,
        "encoder_floor_ratio_full_images": ours / floor_full,  # the floor without the per-cluster re-runs
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages": stages,
        "ours_seconds_per_image": ours / len(images),
        "naive_seconds_per_image": naive / len(images),
        "encoder_seconds_per_image": floor / len(images),
        "encoder_full_image_seconds_per_image": floor_full / len(images),
        "encoder_cluster_rerun_seconds_per_image": floor_local / len(images),
        "names_per_image": float(np.mean([len(v) for v, _ in ours_greedy])),
        "names_identical": names_identical,
        "label_agreement": agreement,  # fraction of pixels labelled alike in the greedy check
        "differing_pixels": int(sum(g.size for g, _, _ in ties)),
        "max_differing_gap": float(max((g.max(initial=0.0) for g, _, _ in ties), default=0.0)),
        "logit_noise": float(max((noise for _, noise, _ in ties), default=0.0)),  # ours vs naive, largest
        "logit_noise_relative": float(max((noise / scale for _, noise, scale in ties), default=0.0)),
        "identical": only_ties,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
