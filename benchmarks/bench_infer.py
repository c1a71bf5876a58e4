"""Inference throughput: AutoSeg's batched pipeline against the released code's flow and against plain transformers
with ordinary batching.

    python benchmarks/bench_infer.py [--images 8] [--repeats 3] [--batch-size 4] [--blip base] [--json out.json]
    python benchmarks/bench_infer.py --blip tiny --clipseg tiny --scales 64 96 --images 2 --repeats 1   # smoke

All three flows run in this process on the same photos with the same models: seeded random weights at BLIP-base (or
``--blip``) and CLIPSeg rd64-refined (or ``--clipseg``) sizes, saved and loaded through AutoSeg's loaders, BLIP's
``[SEP]`` logit biased so that sampled captions end like real BLIP captions (``infer_models.calibrate_sep_bias``: a
random decoder rarely ends one; a constant bias gives geometric lengths, a longer tail than real captions, which
hf_batched pays for: a ``generate`` call runs until its longest row ends, while ours drops a row as it ends); the
default pipeline settings (scales 384 and 512, k = 2..8, 5 sampled captions per cluster, top-p 0.9, 4..25 new tokens,
seed 0) and ``max_names`` 16. The flows (``infer_flows.py``):

- **original**: the released code's order of work, one image at a time: each scale encoded on its own, k-means run
  separately for every k, BLIP's encoder re-run once per cluster, one stock ``generate`` per cluster per caption pass,
  spaCy on one caption at a time; its segmenter step encodes each image once, as the released X-Decoder does: one
  CLIP vision forward per image, the text embeddings of that image's names computed for it (template-averaged
  ``get_text_features`` on the full prompts, one call per name, no cache across images), the decoder for every name.
- **hf_batched**: plain transformers with ordinary batching: per batch of ``--batch-size`` images BLIP's vision tower
  once per scale and AutoSeg's BBoost (the grouping is AutoSeg's method, not a transformers question); per image the
  re-runs of all its clusters in one padded encoder call (masked: transformers' BLIP encoder takes no mask, so this is
  AutoSeg's ``run_encoder``), ONE stock ``generate`` for all its clusters and passes (padded states with an encoder
  attention mask, transformers' own cache, no shared cross-attention; AutoSeg's installed cross-attention only hands
  that mask on, which transformers v5 drops), one spaCy call, and original's segmenter step (the image encoded once;
  stock ``get_text_features`` on each name's prompts, CLIP's zero-shot recipe: one call over all of an image's
  prompts pads them to the longest and was slower on this CPU; so its logits equal original's exactly).
- **ours**: :meth:`autoseg.pipeline.AutoSegPipeline.predict` on batches of ``--batch-size`` (one decoding loop per
  batch that stops computing a caption when it ends: :func:`autoseg.models.blip_decoding.decode`).

Sampling is AutoSeg's per-row seeded Gumbel-max in every flow (the same captions in any batch). After one warm-up run
of each flow on one image (lazy loads, first-call allocations), ``--repeats`` rounds run original, hf_batched and ours
in turn on every image; before each timed run the caches are cleared: the segmenter's text embeddings (the only
results kept across calls) and the CLIP tokenizer's BPE word cache.

The identity check runs on the timed outputs (sampled, ``--batch-size``, every image of every repeat) for the pairs
``ours~original``, ``hf_batched~original`` and ``ours~hf_batched`` (the second is the reference). Per pair:
``names_identical`` and ``name_mismatches`` ({repeat, image} whose names differ); ``label_agreement`` (the smallest
fraction of an image's pixels labelled alike); ``differing_pixels`` (per run, the most of any repeat); ``logit_noise`` =
the largest difference between the two flows' upsampled segmenter logits (recomputed outside the timing: the flows
compute the same function with differently batched products, which round differently in the last bits),
``logit_noise_relative`` = that over the logits' largest size; ``max_differing_gap`` = the largest gap, at a differing
pixel, between the reference flow's logits of the two labels; ``identical`` = the same names, noise within ``TIE`` of
the logits' size and every differing pixel a tie (gap within twice the noise). The top-level ``identical`` is true only
if every pair is.

JSON (``--json``), times in seconds per image:
``seconds_per_image`` {flow: {min, median, max, runs}}; ``images_per_second`` {flow: from the median};
``speedup_vs_original`` and ``speedup_vs_hf_batched`` (median over median) and ``speedups`` (per repeat, paired);
``stages`` {flow: {stage: median over repeats}}, the stages of ``AutoSegPipeline`` (each flow timed with the same
``pipe.timed``); ``caption_new_tokens_mean`` (ours, timed runs: tokens decoded per caption after the prompt, [SEP]
included) and ``caption_tokens`` {flow: {new_tokens_mean, new_tokens_max, captions_per_image, generate_calls_per_image,
row_steps_per_caption}}, where row-steps are the rows of every decoder forward (the decoding work, steps spent on
rows already closed included: row_steps_per_caption - new_tokens_mean is the work spent on ended rows);
``sep_bias`` (added to the ``[SEP]`` logit) and ``sep_calibration_tokens_mean`` (its mean on the calibration states);
``original_segment_image_encodes_per_image`` (CLIP vision forwards per image with names in original's timed runs,
counted by a hook; 1 as in X-Decoder) and ``segment_image_encodes_per_image`` {flow: images through CLIP's vision
tower per image with names}; ``encoder_floor_ratio`` (ours: total over its encode + cluster_states stages, the BLIP
encoder forwards no batching removes on a CPU, from the same timed runs; the earlier separately timed floor is
dropped); ``names_per_image``; ``identity`` {pair: ...} and ``identical``; ``repeats``; ``peak_rss_mb`` (the
process, all flows); and the settings: ``device``, ``dtype``, ``blip``, ``clipseg``, ``scales``, ``images``,
``batch_size``, ``threads``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_flows import FLOWS, LOGITS, GenerateRecorder, Output, ours_logits  # noqa: E402
from infer_models import BLIP_SIZES, CALIBRATION_FILE, CLIPSEG_SIZES, english_words, photos, save_models  # noqa: E402, F401

from autoseg.api import build_pipeline  # noqa: E402
from autoseg.config import PipelineConfig  # noqa: E402
from autoseg.models.segmenters import SegmenterConfig  # noqa: E402
from autoseg.pipeline import STAGES, AutoSegPipeline  # noqa: E402

TIE = 1e-5  # two flows' logits may differ by this much relative to their size (about 100 float32 ulps)
PAIRS = (("ours", "original"), ("hf_batched", "original"), ("ours", "hf_batched"))  # (flow, reference)


def clear_caches(pipe: AutoSegPipeline) -> None:
    """Forget what an earlier run left that a later one would reuse: the segmenter's text embeddings and the CLIP
    tokenizer's BPE word cache (models, spaCy and allocations stay: every flow had its warm-up)."""
    pipe.segmenter.clear_cache()
    bpe = getattr(pipe.segmenter.processor.tokenizer, "backend_tokenizer", None)
    if bpe is not None and hasattr(bpe.model, "_clear_cache"):
        bpe.model._clear_cache()
    gc.collect()


def timed_run(pipe: AutoSegPipeline, flow: str, images: list, batch_size: int) -> dict:
    """One timed run of ``flow`` on every image, caches cleared first: outputs, seconds, stage seconds, the caption
    tokens of every ``generate`` call and the images CLIP's vision tower saw (the recorder and the hook that count
    them cost microseconds a call)."""
    clear_caches(pipe)
    pipe.stage_seconds = dict.fromkeys(STAGES, 0.0)
    encoded = [0]

    def count(module, args, kwargs) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        encoded[0] += pixels.shape[0]

    sync = torch.cuda.synchronize if pipe.captioner.device.type == "cuda" else lambda: None
    hook = pipe.segmenter.model.clip.vision_model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with GenerateRecorder(pipe.captioner.model.text_decoder) as rec:
            sync()
            start = time.perf_counter()
            outputs = FLOWS[flow](pipe, images, batch_size)
            sync()
            seconds = time.perf_counter() - start
    finally:
        hook.remove()
    return dict(
        outputs=outputs,
        seconds=seconds,
        stages=dict(pipe.stage_seconds),
        tokens=rec.tokens,
        row_steps=rec.row_steps,
        calls=rec.calls,
        encoded=encoded[0],
    )


# ---------------------------------------------------------------------------------------------------------------------
# The identity check on the timed outputs


@torch.inference_mode()
def flow_logits(pipe: AutoSegPipeline, flow: str, images: list, outputs: list[Output], bs: int, memo: dict) -> list:
    """The segmenter logits behind ``outputs`` (per image ``C x h x w``, None without names), as ``flow`` computes
    them; memoised on the flow and its vocabularies (the runs are deterministic)."""
    key = (flow, tuple(tuple(o.vocabulary) for o in outputs))
    if key not in memo:
        if flow == "ours":
            memo[key] = ours_logits(pipe, images, [o.vocabulary for o in outputs], bs)
        else:
            fn, seg = LOGITS[flow], pipe.segmenter
            memo[key] = [
                fn(seg, im, o.vocabulary) if o.vocabulary else None for im, o in zip(images, outputs, strict=True)
            ]
    return memo[key]


def compare_image(out: Output, ref: Output, logits: torch.Tensor | None, ref_logits: torch.Tensor | None) -> dict:
    """One image of two flows: same names, and label maps that differ only at float ties of the reference's logits.

    ``noise`` is the largest difference between the two flows' (upsampled) logits; a differing pixel is a tie when the
    reference's logits of the two labels are within ``2 * noise`` (each may move by ``noise``), and the flows agree
    when the noise is float rounding, at most ``TIE`` of the logits' size.
    """
    if out.vocabulary != ref.vocabulary:
        return dict(names=False, ok=False)
    where = np.nonzero(out.label_map != ref.label_map)
    pixels, differing = ref.label_map.size, int(where[0].size)
    if not ref.vocabulary:
        return dict(names=True, ok=differing == 0, agreement=1 - differing / pixels, differing=differing)
    size = ref.label_map.shape
    up = lambda x: F.interpolate(x[None].float(), size=size, mode="bilinear")[0]  # noqa: E731
    a, r = up(logits), up(ref_logits)  # C x H x W, as labels_from_logits upsamples them
    noise, scale = float((a - r).abs().max()), float(r.abs().max())
    gap = 0.0
    if differing:
        if (out.label_map[where] == 0).any() or (ref.label_map[where] == 0).any():  # unlabelled against a name
            gap = float("inf")
        else:
            at = r[:, torch.from_numpy(where[0]), torch.from_numpy(where[1])]  # C x D
            pick = lambda lm: at.gather(0, torch.from_numpy(lm[where] - 1).long()[None])[0]  # noqa: E731
            gap = float((pick(ref.label_map) - pick(out.label_map)).abs().max())
    ok = gap <= 2 * noise and noise <= TIE * scale
    return dict(
        names=True, ok=ok, agreement=1 - differing / pixels, differing=differing, gap=gap, noise=noise, scale=scale
    )


def identity(pipe: AutoSegPipeline, images: list, runs: dict[str, list[dict]], bs: int) -> dict:
    """Every pair of :data:`PAIRS` compared on every image of every repeat (see :func:`compare_image`)."""
    memo: dict = {}
    report = {}
    for flow, ref in PAIRS:
        rows, mismatches, per_run = [], [], []
        for r, (a_run, ref_run) in enumerate(zip(runs[flow], runs[ref], strict=True)):
            la = flow_logits(pipe, flow, images, a_run["outputs"], bs, memo)
            lr = flow_logits(pipe, ref, images, ref_run["outputs"], bs, memo)
            parts = zip(a_run["outputs"], ref_run["outputs"], la, lr, strict=True)
            found = [compare_image(*p) for p in parts]
            mismatches += [dict(repeat=r, image=i) for i, f in enumerate(found) if not f["names"]]
            per_run.append(sum(f.get("differing", 0) for f in found))
            rows += [f for f in found if f["names"]]
        report[f"{flow}~{ref}"] = dict(
            names_identical=not mismatches,
            name_mismatches=mismatches,
            label_agreement=min((f["agreement"] for f in rows), default=1.0),
            differing_pixels=max(per_run),
            max_differing_gap=max((f.get("gap", 0.0) for f in rows), default=0.0),
            logit_noise=max((f.get("noise", 0.0) for f in rows), default=0.0),
            logit_noise_relative=max((f.get("noise", 0.0) / f["scale"] for f in rows if f.get("scale")), default=0.0),
            identical=not mismatches and all(f["ok"] for f in rows),
        )
    return report


# ---------------------------------------------------------------------------------------------------------------------


def summary(runs: dict[str, list[dict]], n: int) -> dict:
    """Times, speedups, stage tables and caption-token figures of the timed runs (see the module docstring)."""
    per_image = {flow: [run["seconds"] / n for run in rs] for flow, rs in runs.items()}
    median = {flow: statistics.median(v) for flow, v in per_image.items()}
    stages = {
        flow: {s: statistics.median(run["stages"].get(s, 0.0) / n for run in rs) for s in STAGES}
        for flow, rs in runs.items()
    }
    tokens = {}
    for flow, rs in runs.items():
        counts = [t for run in rs for t in run["tokens"]]
        tokens[flow] = dict(
            new_tokens_mean=float(np.mean(counts)) if counts else 0.0,
            new_tokens_max=max(counts, default=0),
            captions_per_image=len(counts) / (n * len(rs)),
            generate_calls_per_image=sum(run["calls"] for run in rs) / (n * len(rs)),
            row_steps_per_caption=sum(run["row_steps"] for run in rs) / max(len(counts), 1),
        )
    with_names = {flow: sum(bool(o.vocabulary) for run in rs for o in run["outputs"]) for flow, rs in runs.items()}
    encodes = {flow: sum(run["encoded"] for run in rs) / max(with_names[flow], 1) for flow, rs in runs.items()}
    encoder = stages["ours"]["encode"] + stages["ours"]["cluster_states"]
    return {
        "seconds_per_image": {
            flow: dict(min=min(v), median=median[flow], max=max(v), runs=v) for flow, v in per_image.items()
        },
        "images_per_second": {flow: 1 / m for flow, m in median.items()},
        "speedup_vs_original": median["original"] / median["ours"],
        "speedup_vs_hf_batched": median["hf_batched"] / median["ours"],
        "speedups": {
            "vs_original": [o / u for o, u in zip(per_image["original"], per_image["ours"], strict=True)],
            "vs_hf_batched": [h / u for h, u in zip(per_image["hf_batched"], per_image["ours"], strict=True)],
        },
        "stages": stages,
        "caption_new_tokens_mean": tokens["ours"]["new_tokens_mean"],
        "caption_tokens": tokens,
        "original_segment_image_encodes_per_image": encodes["original"],
        "segment_image_encodes_per_image": encodes,
        "encoder_floor_ratio": median["ours"] / encoder if encoder else None,
        "names_per_image": float(np.mean([len(o.vocabulary) for o in runs["ours"][0]["outputs"]])),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; prints (and with ``--json`` writes) the figures and returns them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three flows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    p.add_argument("--blip", choices=sorted(BLIP_SIZES), default="base")
    p.add_argument("--clipseg", choices=sorted(CLIPSEG_SIZES), default="rd64")
    p.add_argument("--scales", type=int, nargs="+", default=[384, 512], help="BLIP input sizes (multiples of 16)")
    p.add_argument("--max-names", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        p.error("--images and --repeats must be >= 1")
    torch.manual_seed(0)
    images = photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        blip_dir, seg_dir = save_models(Path(tmp), args.blip, args.clipseg)
        calibration = json.loads((blip_dir / CALIBRATION_FILE).read_text())
        segmenter = SegmenterConfig(source=str(seg_dir)).with_options(
            image_size=CLIPSEG_SIZES[args.clipseg]["input_size"]
        )
        config = PipelineConfig(
            blip=str(blip_dir),
            segmenter=segmenter,
            scales=tuple(args.scales),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_names=args.max_names,
        )
        pipe = build_pipeline(config)
    for flow in FLOWS:  # warm-up: lazy loads (spaCy) and first-call allocations outside the timing
        FLOWS[flow](pipe, images[:1], 1)
    runs: dict[str, list[dict]] = {flow: [] for flow in FLOWS}
    for _ in range(args.repeats):
        for flow in FLOWS:
            runs[flow].append(timed_run(pipe, flow, images, args.batch_size))
    checks = identity(pipe, images, runs, args.batch_size)
    result = {
        "device": args.device,
        "dtype": args.dtype,
        "blip": args.blip,
        "clipseg": args.clipseg,
        "scales": args.scales,
        "images": len(images),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        **summary(runs, len(images)),
        "sep_bias": calibration["sep_bias"],
        "sep_calibration_tokens_mean": calibration["new_tokens_mean"],
        "identical": all(c["identical"] for c in checks.values()),
        "identity": checks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
