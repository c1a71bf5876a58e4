"""The ShapesWorld recipe: train the demo models from scratch on CPU and score them on a held-out set.

``python -m autoseg.recipes.shapes --out runs/shapes`` runs, in order (each stage a ``train.py`` run with a config
of ``configs/experiment/shapes/``, so every setting is in YAML and TensorBoard shows every curve):

1. ``data``: the ShapesWorld training set (generated once into a cache folder);
2. ``captioner_stage1``: a small BLIP vision encoder trained with the per-patch class loss only (cheap);
3. ``captioner_stage2``: the BLIP trained on region captions on top of stage 1 (it names the clusters);
4. ``segmenter_stage1``: a small CLIPSeg vision tower trained with the per-patch class loss only;
5. ``segmenter_stage2``: the whole CLIPSeg (decoder and text tower too) on top of stage 1;
6. ``enhancer``: the embedding-enhancer head on the captioner's tokens;
7. ``assemble``: the exports copied into one pipeline folder (``pipeline.yaml`` + models; ``--ship`` writes it to the
   package as the ``demo`` preset: ``infer.py --preset demo``, ``autoseg.load("demo")``);
8. ``evaluate``: the pipeline scored as ``eval.py`` scores it on a freshly generated held-out ShapesWorld set (seed
   never used in training) with the embedding mapper, and the enhancer's cluster mIoU against the identity head on
   that set.

Each training stage is a ``train.py`` run called as a function (:func:`autoseg.lit.trainer.run`) that returns its
figures. The training data are generated once first (``data``). Captioner and segmenter do not depend on each other,
so the two lanes ``captioner_stage1 -> captioner_stage2 -> enhancer`` and ``segmenter_stage1 -> segmenter_stage2`` run
side by side (``--jobs 2``, the default: a worker process per lane, the CPU threads split between them); ``--jobs 1``
runs the stages one after another in this process. Each stage's output goes to ``OUT/logs/STAGE.log``.

``--scale 0.01`` shortens every stage (a smoke run); ``--from STAGE`` resumes after finished stages. Timings and
figures go to ``OUT/recipe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from autoseg.recipes.common import (
    REPO,
    StageLog,
    copy_models,
    cores,
    dump_pipeline,
    eval_pipeline,
    export_dir,
    run_lanes,
    run_train,
)

CONFIGS = REPO / "configs" / "experiment" / "shapes"
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"
STAGES = (
    "data",
    "captioner_stage1",
    "captioner_stage2",
    "segmenter_stage1",
    "segmenter_stage2",
    "enhancer",
    "assemble",
    "evaluate",
)
# Training stages that depend on each other only within a lane; the lanes run side by side.
LANES = (("captioner_stage1", "captioner_stage2", "enhancer"), ("segmenter_stage1", "segmenter_stage2"))
HELDOUT_SEED = 424242  # never used for training data (training uses seed 1)
TRAIN_STEPS = {
    "captioner_stage1": 2200,
    # at 192 px a step costs about twice one at 128; 2,200 steps made this lane the long pole (37.0 of 39.0 minutes)
    "captioner_stage2": 2000,
    # the segmenter needs its steps: 2,500 + 4,000 ended at 69 validation mIoU (square 31) against 76 (46) with
    # 4,000 + 4,500; stage 2 decodes 5 names per image (the classes present and the hardest absent ones), 0.7x a step
    "segmenter_stage1": 3600,
    "segmenter_stage2": 4500,
    "enhancer": 1000,  # 1,000 and 1,500 steps gave the same validation cluster mIoU (72.2, 72.0)
}

# The pipeline the shipped models are meant for (paths are filled in by ``assemble``). Chosen on a development set
# (seed 777, neither training nor held-out): on an 8 x 8 / 12 x 12 patch grid a thing covers a handful of patches, so
# BBoost keeps twelve clusters without CRF or majority smoothing (both erase small things), and eight captions per
# cluster sampled from the whole top-50 (top-p 1.0) name nearly every thing present: recall matters more than the
# false names it brings, since the segmenter decides which name each pixel gets (dev mIoU 73.2 with six clusters and
# three captions at top-p 0.9, 78.1 with these).
DEMO_PIPELINE = {
    "scales": [128, 192],
    "caption_scale": 192,  # the captioner trains at 192 px: a 12 x 12 patch grid, so small shapes span more patches
    "device": "cpu",
    "batch_size": 8,
    "bboost": {
        "k_min": 12,
        "k_max": 12,
        "n_init": 4,
        "max_iter": 50,
        "pos_dim": 32,
        "pos_weight": 0.5,
        "crf_iters": 0,
        "majority_max_passes": 0,
    },
    "caption": {
        "mode": "global",
        "sample": True,
        "n_passes": 8,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "min_new_tokens": 1,
    },
    # trained on 128 px crops, the segmenter names small shapes better on a 12 x 12 grid (192 px) than on 8 x 8
    "segmenter": {"name": "clipseg", "image_size": 192, "templates": ["a photo of a {}."], "threshold": 0.0},
}


def small_data(scale: float) -> dict:
    """ShapesWorld overrides of a shortened run (``--scale`` below 1): a small dataset."""
    return {"n_train": 64, "n_val": 8} if scale < 1 else {}


def train(
    out: Path, stage: str, scale: float, extra: Sequence[str] = (), threads: int | None = None, in_process: bool = True
) -> None:
    """One ``train.py fit`` run of ``configs/experiment/shapes/STAGE.yaml`` into ``out/STAGE`` (a fresh folder);
    its output goes to ``out/logs/STAGE.log``."""
    steps = max(4, round(TRAIN_STEPS[stage] * scale))
    args = [f"--trainer.max_steps={steps}"]
    if scale < 1:
        args += [f"--trainer.val_check_interval={max(2, steps // 2)}"]
        args += [f"--data.shapesworld.{k}={v}" for k, v in small_data(scale).items()]
    log = out / "logs" / f"{stage}.log"
    print(f"[recipe] {stage}: started ({steps} steps), log {log}", flush=True)
    run_train(CONFIGS / f"{stage}.yaml", out / stage, log, [*args, *extra], threads, in_process=in_process)


def prepare_data(scale: float, workers: int) -> Path:
    """Generate the ShapesWorld train/val folders the training configs use (once; all four must agree)."""
    from autoseg.data.datamodules import ShapesWorldSpec, prepare_shapesworld

    specs = {}
    for stage in TRAIN_STEPS:
        data = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text(encoding="utf-8"))["data"]["shapesworld"]
        specs[stage] = ShapesWorldSpec(**(data | small_data(scale)))
    folders = {stage: spec.folder() for stage, spec in specs.items()}
    if len(set(folders.values())) != 1:
        raise ValueError(f"the recipe configs describe different ShapesWorld data: {folders}; make them agree")
    return prepare_shapesworld(next(iter(specs.values())), workers=workers)


def assemble(out: Path, ship: bool) -> Path:
    """Copy the exports into the pipeline folder ``out/demo`` (or the package's ``demo`` preset) with its
    ``pipeline.yaml`` (``./`` paths): the layout ``save_pretrained`` writes and ``autoseg.load`` reads."""
    target = PRESET_DIR / "demo" if ship else out / "demo"
    yaml_path = target / "pipeline.yaml"
    pipeline = copy_models(
        yaml_path,
        target,
        export_dir(out, "captioner_stage2", "blip"),
        export_dir(out, "segmenter_stage2", "segmenter"),
        export_dir(out, "enhancer", "enhancer.safetensors"),
        DEMO_PIPELINE,
    )
    header = "# ShapesWorld demo models, trained from scratch by `python -m autoseg.recipes.shapes`.\n"
    return dump_pipeline(yaml_path, pipeline, header)


def evaluate(out: Path, preset_yaml: Path, n: int) -> dict:
    """Held-out ShapesWorld: pipeline mIoU through eval.py, and the enhancer's cluster mIoU vs the identity head."""
    from autoseg.data.shapes import main as generate

    heldout = out / "heldout"
    if not (heldout / "classes.txt").is_file() and generate(
        ["--seed", str(HELDOUT_SEED), "--n", str(n), "--out", str(heldout)]
    ):
        raise RuntimeError(f"could not generate the held-out set into {heldout}")
    figures = eval_pipeline(preset_yaml, heldout, out / "eval" / "report.json")
    ckpts = sorted((out / "enhancer" / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    cluster = {}
    for size in DEMO_PIPELINE["scales"]:  # the enhancer serves BBoost at every clustering scale of the pipeline
        args = [
            f"--model.init_args.blip={export_dir(out, 'captioner_stage2', 'blip')}",
            f"--ckpt_path={ckpts[-1]}",
            f"--data.val.root={heldout}",
            "--data.val.dataset=folder",
            "--data.shapesworld=null",
            f"--data.image_size={size}",
        ]
        root = out / "eval" / f"enhancer_{size}"
        log = out / "logs" / f"validate_enhancer_{size}.log"
        metrics = run_train(CONFIGS / "enhancer.yaml", root, log, args, subcommand="validate")["metrics"]
        cluster[str(size)] = {
            "identity": 100 * metrics["val/cluster_mIoU_identity"],
            "enhanced": 100 * metrics["val/cluster_mIoU"],
        }
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
    p.add_argument("--jobs", type=int, default=2, help="training lanes run at once (1: one stage after another)")
    args = p.parse_args(argv)
    if not CONFIGS.is_dir():
        p.error(f"{CONFIGS} not found: the recipe runs from a checkout of the AutoSeg repository")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: need at least 1")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog(out / "recipe.json")
    extra = {
        "segmenter_stage2": lambda: [f"--model.init_args.segmenter={export_dir(out, 'segmenter_stage1', 'segmenter')}"],
        "captioner_stage2": lambda: [f"--model.init_args.blip={export_dir(out, 'captioner_stage1', 'blip')}"],
        "enhancer": lambda: [f"--model.init_args.blip={export_dir(out, 'captioner_stage2', 'blip')}"],
    }
    todo = STAGES[STAGES.index(args.start) :]
    t_start = time.perf_counter()
    if "data" in todo:
        log.timed("data", lambda: prepare_data(args.scale, workers=cores()))
    lanes = [[s for s in lane if s in todo] for lane in LANES]
    in_process = args.jobs == 1 or sum(1 for lane in lanes if lane) < 2  # lanes side by side: a process each

    def stage(s: str, threads: int) -> None:
        train(out, s, args.scale, extra.get(s, list)(), threads, in_process)

    failures = run_lanes(lanes, stage, log, args.jobs)
    if failures:
        for e in failures:
            print(f"[recipe] {e}", file=sys.stderr)
        return 1
    if "assemble" in todo:
        log.timed("assemble", lambda: log.update(preset=str(assemble(out, args.ship))))
    if "evaluate" in todo:
        log.timed("evaluate", lambda: log.update(evaluation=evaluate(out, Path(log.data["preset"]), args.heldout)))
    wall = round((time.perf_counter() - t_start) / 60, 1)
    runs = [*log.data.get("runs", []), {"from": args.start, "jobs": args.jobs, "wall_minutes": wall}]
    log.update(runs=runs)
    print(f"[recipe] {wall:.1f} min wall-clock from {args.start} ({args.jobs} lanes at once); summary in {log.path}")
    if "evaluation" in log.data:
        ev = log.data["evaluation"]
        print(f"[recipe] held-out mIoU {ev['mIoU']:.1f}")
        for size, c in ev["cluster_mIoU"].items():
            print(f"[recipe] cluster mIoU at {size} px: enhancer {c['enhanced']:.1f}, identity {c['identity']:.1f}")
        per_class = ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in ev["per_class"].items())
        print(f"[recipe] per-class IoU: {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
