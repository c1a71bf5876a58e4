"""Every check a GPU user depends on, as one script: half-precision inference with the enhancer (the trained demo
preset's agreement with float32; every segmenter backend runs), a bf16-mixed training step of every LightningModule,
multi-process prediction, and images/s with peak memory per backend.

    python benchmarks/gpu_check.py [--json out.json]          # on a GPU: real model sizes, random weights
    python benchmarks/gpu_check.py --smoke [--json out.json]  # the same checks on CPU with tiny models (CI can run it)

Real sizes are random weights built from the real configurations (BLIP-large, CLIPSeg rd64-refined, SAM 3, Grounding
DINO tiny + SAM ViT-B), saved and loaded through AutoSeg's loaders: no download. ``--json`` writes
``{"device", "smoke", "checks": [{"name", "ok", ...}], "ok"}``; the exit status is 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import autoseg  # noqa: E402
from autoseg.models import scratch  # noqa: E402
from autoseg.models.enhancer import EmbeddingEnhancer, EnhancerConfig, save_enhancer  # noqa: E402

BACKENDS = ("clipseg", "sam3", "grounded_sam")
MODULES = ("enhancer", "segmenter", "segmenter_sam3", "captioner")  # configs/debug/*.yaml
MIN_AGREEMENT = 0.8  # per-pixel names of half precision vs float32
DTYPES = ("float32", "bfloat16", "float16")


def models(root: Path, smoke: bool) -> dict[str, str]:
    """Model folders: BLIP, an enhancer for it, and one segmenter per backend (tiny for ``smoke``, else real sizes)."""
    torch.manual_seed(0)
    if smoke:
        blip = scratch.save(*scratch.make_blip(), root / "blip")
        seg = {
            "clipseg": scratch.save(*scratch.make_clipseg(), root / "clipseg"),
            "sam3": scratch.save(*scratch.make_sam3(), root / "sam3"),
            "grounded_sam": scratch.save_grounded_sam(scratch.make_grounding_dino(), scratch.make_sam(), root / "gs"),
        }
    else:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from infer_models import save_models

        blip, clipseg = save_models(root, "large")
        seg = {"clipseg": clipseg, "sam3": real_sam3(root / "sam3"), "grounded_sam": real_grounded_sam(root / "gs")}
    from transformers import BlipConfig

    dim = BlipConfig.from_pretrained(blip).vision_config.hidden_size
    enhancer = save_enhancer(EmbeddingEnhancer(EnhancerConfig(dim=dim)), root / "enhancer.safetensors")
    return {"blip": str(blip), "enhancer": str(enhancer), **{k: str(v) for k, v in seg.items()}}


def real_sam3(out: Path) -> Path:
    """SAM 3 with its released configuration (1008 px, 840 M parameters) and random weights."""
    from infer_models import english_words
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    from autoseg.models.segmenters.sam3 import TEXT_LENGTH

    tokenizer = scratch.clip_tokenizer(english_words(), model_max_length=TEXT_LENGTH)
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer)
    return scratch.save(Sam3Model(Sam3Config()), processor, out)


def real_grounded_sam(out: Path) -> Path:
    """Grounding DINO tiny (Swin-T, BERT-base) and SAM ViT-B with their released configurations, random weights."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
    )

    tokenizer = scratch.make_grounding_dino()[1].tokenizer  # BERT-base-uncased's vocabulary, offline
    detector = (
        GroundingDinoForObjectDetection(GroundingDinoConfig()),
        GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer),
    )
    sam = (SamModel(SamConfig()), SamProcessor(image_processor=SamImageProcessor()))
    return scratch.save_grounded_sam(detector, sam, out)


def sample_images(n: int, size: int = 256) -> list:
    from autoseg.data.shapes import ShapesConfig, generate_sample

    return [generate_sample(90001, i, ShapesConfig(size=size))[0] for i in range(n)]


def pixel_names(pred) -> np.ndarray:
    return np.array(["", *pred.vocabulary], dtype=object)[pred.label_map]


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------------------------
def agreement(preds: list, reference: list) -> float:
    """The mean fraction of pixels two runs give the same name."""
    return float(np.mean([(pixel_names(a) == pixel_names(b)).mean() for a, b in zip(preds, reference, strict=True)]))


def check_demo_half_precision(ctx: dict) -> dict:
    """The trained demo preset with its enhancer in bfloat16 and float16 names the pixels as in float32."""
    images = sample_images(len(ctx["images"]), size=128)
    out = {dtype: autoseg.load("demo", device=ctx["device"], dtype=dtype)(images, progress=False) for dtype in DTYPES}
    agree = {dtype: agreement(out[dtype], out["float32"]) for dtype in DTYPES[1:]}
    return {"ok": min(agree.values()) >= MIN_AGREEMENT, "agreement": agree}


def check_half_precision(ctx: dict, backend: str) -> dict:
    """Every backend runs in bfloat16 and float16 with an enhancer and writes every image. (Random weights put many
    names within rounding of each other, so their agreement with float32 is reported, not required.)"""
    out = {}
    for dtype in DTYPES:
        seg = autoseg.load(
            None,
            blip=ctx["models"]["blip"],
            enhancer=ctx["models"]["enhancer"],
            segmenter_backend=backend,
            segmenter=ctx["models"][backend],
            device=ctx["device"],
            dtype=dtype,
            scales=ctx["scales"],
            caption_scale=ctx["scales"][0],
        )
        assert {p.dtype for p in seg.enhancer.parameters()} == {getattr(torch, dtype)}
        out[dtype] = seg(ctx["images"], progress=False)
        del seg
    pairs = [(p, im) for preds in out.values() for p, im in zip(preds, ctx["images"], strict=True)]
    written = all(p.label_map.shape[::-1] == im.size and p.label_map.max() <= len(p.vocabulary) for p, im in pairs)
    return {"ok": written, "agreement": {dtype: agreement(out[dtype], out["float32"]) for dtype in DTYPES[1:]}}


def check_train_step(ctx: dict, module: str) -> dict:
    """Two bf16-mixed training steps of a debug config on the device: a finite loss and a checkpoint."""
    from autoseg.lit.trainer import run

    root = ctx["tmp"] / f"train_{module}"
    accelerator = "gpu" if ctx["device"].startswith("cuda") else "cpu"
    result = run(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "debug" / f"{module}.yaml"),
            f"--trainer.default_root_dir={root}",
            f"--trainer.accelerator={accelerator}",
            "--trainer.precision=bf16-mixed",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            f"--data.shapesworld.root={ctx['tmp'] / 'shapes'}",
            "--data.shapesworld.n_train=8",
            "--data.shapesworld.n_val=2",
            "--data.batch_size=4",
        ]
    )
    loss = result.metrics.get("train/loss")
    return {"ok": result.step == 2 and loss is not None and bool(np.isfinite(loss)), "train_loss": loss}


def check_multi_process_predict(ctx: dict) -> dict:
    """``infer.py --devices 2`` writes what one process writes (CPU: 2 processes; GPU: needs 2 GPUs)."""
    gpus = torch.cuda.device_count() if ctx["device"].startswith("cuda") else 0
    if ctx["device"].startswith("cuda") and gpus < 2:
        return {"ok": True, "skipped": f"{gpus} GPU visible; multi-process prediction needs 2"}
    folder = ctx["tmp"] / "predict_in"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(ctx["images"]):
        image.save(folder / f"{i}.png")
    common = ["--blip", ctx["models"]["blip"], "--segmenter", ctx["models"]["clipseg"], "--device", ctx["device"]]
    common += ["--config", str(REPO / "configs" / "debug" / "pipeline.yaml")] if ctx["smoke"] else []
    outs = {}
    for devices in (1, 2):
        out = ctx["tmp"] / f"predict_{devices}"
        cmd = [sys.executable, str(REPO / "infer.py"), str(folder), "-o", str(out), "--devices", str(devices), *common]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            return {"ok": False, "error": done.stderr[-1000:]}
        outs[devices] = {p.name: json.loads(p.read_text())["vocabulary"] for p in out.glob("[0-9]*.json")}
    return {"ok": outs[1] == outs[2] and len(outs[1]) == len(ctx["images"]), "images": len(outs[1])}


def check_throughput(ctx: dict, backend: str) -> dict:
    """Images/s and peak memory of the whole pipeline in bfloat16 (GPU) or float32 (CPU) after a warm-up batch."""
    dtype = "bfloat16" if ctx["device"].startswith("cuda") else "float32"
    seg = autoseg.load(
        None,
        blip=ctx["models"]["blip"],
        segmenter_backend=backend,
        segmenter=ctx["models"][backend],
        device=ctx["device"],
        dtype=dtype,
        batch_size=ctx["batch_size"],
        scales=ctx["scales"],
        caption_scale=ctx["scales"][0],
    )
    seg(ctx["images"][: ctx["batch_size"]], progress=False)
    if ctx["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    preds = seg(ctx["images"], progress=False)
    if ctx["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "ok": len(preds) == len(ctx["images"]),
        "dtype": dtype,
        "images_per_s": len(preds) / seconds,
        "peak_memory_mb": peak_memory_mb(ctx["device"]),
        "stages_seconds_per_image": {k: v / len(preds) for k, v in seg.last_stage_seconds.items()},
    }


def run_check(name: str, fn: Callable[[], dict]) -> dict:
    t0 = time.perf_counter()
    try:
        found = fn()
    except Exception as e:  # noqa: BLE001 - a failed check is reported, the others still run
        found = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    found = {"name": name, **found, "ok": bool(found["ok"]), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({k: v for k, v in found.items() if k != "traceback"}), flush=True)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU: the checks themselves, no figures")
    p.add_argument("--device", help="default: cuda when available (cpu with --smoke)")
    p.add_argument("--images", type=int, help="images per check (default 4 with --smoke, else 64)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = {"device": device, "smoke": args.smoke, "tmp": Path(tmp)}
        ctx["models"] = models(Path(tmp), args.smoke)
        ctx["images"] = sample_images(args.images or (4 if args.smoke else 64))
        ctx["scales"] = [64, 96] if args.smoke else [384, 512]
        ctx["batch_size"] = 2 if args.smoke else 16
        checks = [run_check("half_precision[demo]", lambda: check_demo_half_precision(ctx))]
        checks += [run_check(f"half_precision[{b}]", lambda b=b: check_half_precision(ctx, b)) for b in BACKENDS]
        checks += [run_check(f"bf16_mixed_train[{m}]", lambda m=m: check_train_step(ctx, m)) for m in MODULES]
        checks.append(run_check("multi_process_predict", lambda: check_multi_process_predict(ctx)))
        checks += [run_check(f"throughput[{b}]", lambda b=b: check_throughput(ctx, b)) for b in BACKENDS]
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    result = {"device": name, "smoke": args.smoke, "checks": checks, "ok": all(c["ok"] for c in checks)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{sum(c['ok'] for c in checks)} of {len(checks)} checks passed on {name}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
