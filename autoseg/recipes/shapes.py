"""The ShapesWorld recipe: train the demo models from scratch on CPU and score them on a held-out set.

``python -m autoseg.recipes.shapes --out runs/shapes`` runs, in order (each stage a ``train.py`` run with a config
of ``configs/experiment/shapes/``, so every setting is in YAML and TensorBoard shows every curve):

1. ``captioner``: a small BLIP trained on region captions (it names the clusters);
2. ``segmenter_stage1``: a small CLIPSeg vision tower trained with the per-patch class loss only (cheap);
3. ``segmenter_stage2``: the whole CLIPSeg (decoder and text tower too) on top of stage 1;
4. ``enhancer``: the embedding-enhancer head on the captioner's tokens;
5. ``assemble``: the exports copied into one folder with a pipeline YAML (``--ship`` writes it to the package as the
   ``demo`` preset: ``infer.py --preset demo``);
6. ``evaluate``: ``eval.py`` on a freshly generated held-out ShapesWorld set (seed never used in training) with the
   embedding mapper, and the enhancer's cluster mIoU against the identity head on that set.

``--scale 0.01`` shortens every stage (a smoke run); ``--from STAGE`` resumes after finished stages. Timings and
figures go to ``OUT/recipe.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from autoseg.utils.io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiment" / "shapes"
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
STAGES = ("captioner", "segmenter_stage1", "segmenter_stage2", "enhancer", "assemble", "evaluate")
HELDOUT_SEED = 424242  # never used for training data (training uses seed 1)
TRAIN_STEPS = {"captioner": 2100, "segmenter_stage1": 2500, "segmenter_stage2": 1500, "enhancer": 1500}

# The pipeline the shipped models are meant for (paths are filled in by ``assemble``).
DEMO_PIPELINE = {
    "scales": [128, 192],
    "caption_scale": 128,
    "device": "cpu",
    "batch_size": 8,
    "bboost": {"k_min": 2, "k_max": 6, "n_init": 4, "max_iter": 50, "pos_dim": 32, "pos_weight": 0.5},
    "caption": {"mode": "global", "sample": False, "max_new_tokens": 12, "min_new_tokens": 1},
    "segmenter": {"name": "clipseg", "image_size": 128, "templates": ["a photo of a {}."], "threshold": 0.0},
}


def export_dir(out: Path, stage: str, kind: str) -> Path:
    """The ``best`` export of a stage (``kind``: blip, segmenter or enhancer.safetensors)."""
    path = out / stage / "lightning_logs" / "version_0" / "export" / "best" / kind
    if not path.exists():
        raise FileNotFoundError(f"{path}: stage {stage!r} has no export yet; run it first (--from {stage})")
    return path


def train(out: Path, stage: str, config: str, scale: float, extra: Sequence[str] = ()) -> None:
    """One ``train.py fit`` run into ``out/stage`` (a fresh folder)."""
    root = out / stage
    shutil.rmtree(root, ignore_errors=True)
    steps = max(4, round(TRAIN_STEPS[stage] * scale))
    args = [sys.executable, str(REPO / "train.py"), "fit", "-c", str(CONFIGS / config)]
    args += [f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}"]
    if scale < 1:
        every = max(2, steps // 2)
        args += [f"--trainer.val_check_interval={every}", "--data.shapesworld.n_train=64", "--data.shapesworld.n_val=8"]
    args += list(extra)
    print(f"[recipe] {stage}: {' '.join(args[1:])}", flush=True)
    subprocess.run(args, check=True)


def assemble(out: Path, ship: bool) -> Path:
    """Copy the exports into ``out/demo`` (or the package's presets) with a pipeline YAML using ``./`` paths."""
    target = PRESET_DIR / "demo" if ship else out / "demo"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(export_dir(out, "captioner", "blip"), target / "blip")
    shutil.copytree(export_dir(out, "segmenter_stage2", "segmenter"), target / "segmenter")
    shutil.copy2(export_dir(out, "enhancer", "enhancer.safetensors"), target / "enhancer.safetensors")
    pipeline = {"blip": "./demo/blip", "enhancer": "./demo/enhancer.safetensors", **DEMO_PIPELINE}
    pipeline["segmenter"] = {**DEMO_PIPELINE["segmenter"], "source": "./demo/segmenter"}
    import yaml

    header = "# ShapesWorld demo models, trained from scratch by `python -m autoseg.recipes.shapes`.\n"
    yaml_path = target.parent / "demo.yaml"
    yaml_path.write_text(header + yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    return yaml_path


def evaluate(out: Path, preset_yaml: Path, n: int) -> dict:
    """Held-out ShapesWorld: pipeline mIoU through eval.py, and the enhancer's cluster mIoU vs the identity head."""
    heldout = out / "heldout"
    if not (heldout / "classes.txt").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autoseg.data.shapes",
                "--seed",
                str(HELDOUT_SEED),
                "--n",
                str(n),
                "--out",
                str(heldout),
            ],
            check=True,
        )
    report = out / "eval" / "report.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            "--dataset",
            "folder",
            "--root",
            str(heldout),
            "--config",
            str(preset_yaml),
            "--mapper",
            "embedding",
            "--report",
            str(report),
            "--no-progress",
        ],
        check=True,
    )
    figures = json.loads(report.read_text())
    ckpts = sorted((out / "enhancer" / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    validate = [
        sys.executable,
        str(REPO / "train.py"),
        "validate",
        "-c",
        str(CONFIGS / "enhancer.yaml"),
        f"--model.init_args.blip={export_dir(out, 'captioner', 'blip')}",
        f"--ckpt_path={ckpts[-1]}",
        f"--trainer.default_root_dir={out / 'eval' / 'enhancer'}",
        f"--data.val.root={heldout}",
        "--data.val.dataset=folder",
        "--data.shapesworld=null",
    ]
    result = subprocess.run(validate, check=True, capture_output=True, text=True)
    cluster = {}
    for line in result.stdout.splitlines():
        for key in ("val/cluster_mIoU_identity", "val/cluster_mIoU"):
            if f" {key} " in line and key not in cluster:
                cluster[key] = float(line.split("│")[2])
    return {
        "mIoU": figures["mIoU"],
        "per_class": figures["per_class"],
        "mapping": figures["mapping"],
        "cluster_mIoU": cluster,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autoseg.recipes.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/shapes"), help="run folder")
    p.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0], help="skip the stages before this one")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (0.01: smoke run)")
    p.add_argument("--ship", action="store_true", help="write the models to the package as the 'demo' preset")
    p.add_argument("--heldout", type=int, default=200, help="held-out images to score")
    args = p.parse_args(argv)
    if not CONFIGS.is_dir():
        p.error(f"{CONFIGS} not found: the recipe runs from a checkout of the AutoSeg repository")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "recipe.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"seconds": {}}
    plan = {
        "captioner": lambda: train(out, "captioner", "captioner.yaml", args.scale),
        "segmenter_stage1": lambda: train(out, "segmenter_stage1", "segmenter_stage1.yaml", args.scale),
        "segmenter_stage2": lambda: train(
            out,
            "segmenter_stage2",
            "segmenter_stage2.yaml",
            args.scale,
            [f"--model.init_args.segmenter={export_dir(out, 'segmenter_stage1', 'segmenter')}"],
        ),
        "enhancer": lambda: train(
            out,
            "enhancer",
            "enhancer.yaml",
            args.scale,
            [f"--model.init_args.blip={export_dir(out, 'captioner', 'blip')}"],
        ),
        "assemble": lambda: log.update(preset=str(assemble(out, args.ship))),
        "evaluate": lambda: log.update(evaluation=evaluate(out, Path(log["preset"]), args.heldout)),
    }
    for stage in STAGES[STAGES.index(args.start) :]:
        t0 = time.perf_counter()
        plan[stage]()
        log["seconds"][stage] = round(time.perf_counter() - t0, 1)
        atomic_write_json(log_path, log)
    train_minutes = sum(v for k, v in log["seconds"].items() if k in TRAIN_STEPS) / 60
    print(f"[recipe] training took {train_minutes:.1f} min; summary in {log_path}")
    if "evaluation" in log:
        ev = log["evaluation"]
        print(f"[recipe] held-out mIoU {ev['mIoU']:.1f}; cluster mIoU {ev['cluster_mIoU']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
