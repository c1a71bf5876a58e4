"""The adapt recipe: one command from a labelled folder to a fine-tuned pipeline.

``python -m autoseg.recipes.adapt --from PRESET_OR_YAML --data DIR --out OUT [--minutes M] [--val DIR]`` runs:

1. ``data``: ``OUT/data/{train,val}``, a view of ``DIR`` (plus ``--replay DIR``, old-domain images whose masks are
   re-indexed into the new class list) with region captions, training images that show a new class listed twice,
   and per-class loss weights (:mod:`autoseg.recipes.adapt_data`);
2. ``vocabulary``: the starting BLIP with the words of the class names its tokenizer splits into pieces added as whole
   words (embedding and output rows resized, new rows the mean of the word's pieces), saved to ``OUT/work/blip``, and
   the stage configs written to ``OUT/configs/`` (``train.py fit -c OUT/configs/STAGE.yaml`` reruns a stage);
   the captioner and the enhancer train at the caption scale the adapted pipeline will caption at
   (``--caption-scale``, by default the finest of the starting pipeline's ``scales``: new classes are often small
   shapes that a coarse caption grid blurs);
3. ``captioner``, ``enhancer`` (after the captioner) and ``segmenter`` (beside them): ``train.py`` fine-tunes;
4. ``assemble``: ``OUT/pipeline.yaml`` with the models in ``OUT/models/`` (``infer.py``/``eval.py --config``);
5. ``evaluate``: the starting and the adapted pipeline scored on ``--val`` and ``--old-val`` with ``eval.py``:
   ``OUT/adapt.json`` and ``OUT/adapt.md``.

``--minutes`` bounds the training: the lanes ``captioner -> enhancer`` and ``segmenter`` run side by side and share
it (each stage has a step budget scaled from its 20-minute count and a ``trainer.max_time`` bound). A killed run
resumes with ``--resume``: finished stages are skipped and an interrupted one continues from its ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from autoseg.recipes.adapt_data import (  # noqa: F401  (re-exported: the recipe's data stage)
    CAPTION_TEMPLATES,
    VAL_EVERY,
    article,
    prepare_data,
    read_classes,
    region_captions,
)
from autoseg.recipes.common import (
    REPO,
    StageLog,
    copy_models,
    dump_pipeline,
    eval_pipeline,
    export_dir,
    run_lanes,
    run_train,
)
from autoseg.utils.io import atomic_write_text

CONFIGS = REPO / "configs" / "experiment" / "adapt"
STAGES = ("data", "vocabulary", "captioner", "segmenter", "enhancer", "assemble", "evaluate")
LANES = (("captioner", "enhancer"), ("segmenter",))
NOMINAL_MINUTES = 20.0  # the configs' max_steps are the step counts of a 20-minute run
# of --minutes, within a lane. The enhancer head only re-fits to the adapted tokens (on the demo its cluster mIoU was
# flat after 200 steps, 2.3 minutes), while the captioner, which names the new classes, was still cut by its time limit:
# it gets what the enhancer leaves, so that both lanes end together.
SHARE = {"captioner": 0.85, "enhancer": 0.15, "segmenter": 1.0}
TIME_MARGIN = 0.9  # of a stage's share given to trainer.max_time (the rest: start-up, validation, export)
SCALED_STAGES = ("captioner", "enhancer")  # stages that train at the caption scale: their step counts follow it


# ----------------------------------------------------------------------------------------------------- models


class InitEnhancer(L.Callback):
    """Start a fit from an exported enhancer head (``enhancer.safetensors``); a resumed fit's checkpoint wins.

    Args:
        path: the head to start from.
    """

    def __init__(self, path: str):
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from autoseg.models.enhancer import load_enhancer

        start = load_enhancer(self.path)
        if start.config != pl_module.enhancer.config:
            raise ValueError(
                f"{self.path}: head {start.config} differs from the configured head {pl_module.enhancer.config}; "
                "set model.init_args.head_* to the starting head's shape"
            )
        pl_module.enhancer.load_state_dict(start.state_dict())  # strict: every key must match


def starting_pipeline(source: str) -> tuple[Path, dict[str, Any]]:
    """The pipeline YAML of ``--from`` (anything ``autoseg.load`` takes), and its settings (absolute model paths)."""
    from autoseg.api import pipeline_yaml
    from autoseg.config import load_config, to_dict

    path = pipeline_yaml(source)
    return path, to_dict(load_config(path))


def grow_blip(source: str, classes: Sequence[str], out: Path) -> list[str]:
    """Save the starting BLIP with the class names' missing words added to its vocabulary into ``out``."""
    from autoseg.lit.sources import grow_blip_vocabulary
    from autoseg.models.blip import BlipCaptioner

    blip = BlipCaptioner.from_pretrained(source)
    words = grow_blip_vocabulary(blip, classes)
    shutil.rmtree(out, ignore_errors=True)
    blip.model.save_pretrained(out)
    blip.processor.save_pretrained(out)
    return words


def known_classes(blip: str) -> list[str]:
    """Classes a BLIP export was trained on (its ``autoseg_training.json``), empty when unknown."""
    info = Path(blip) / "autoseg_training.json"
    return list(json.loads(info.read_text()).get("classes", [])) if info.is_file() else []


def pick_caption_scale(settings: dict[str, Any], requested: int | None) -> int:
    """The adapted pipeline's caption scale: ``requested``, or the finest of the starting pipeline's scales.

    Raises:
        ValueError: ``requested`` is not one of the scales (the pipeline only captions at a scale it encodes at).
    """
    scales = [int(s) for s in settings["scales"]]
    if requested is None:
        return max(scales)
    if requested not in scales:
        raise ValueError(f"caption scale {requested} is not one of the starting pipeline's scales {scales}")
    return requested


def _hms(seconds: float) -> str:
    s = max(60, int(seconds))
    return f"00:{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def stage_configs(out: Path, settings: dict[str, Any], data: dict[str, Any], minutes: float, scale: float) -> dict:
    """The LightningCLI config of each training stage, from ``configs/experiment/adapt/`` filled in.

    A template's ``max_steps`` is its 20-minute step count at its ``data.image_size``; the captioner's and the
    enhancer's train at ``settings["caption_scale"]`` instead, and their step counts scale with the inverse of the
    side (on the demo models a captioner step cost 1.5 times as much at 192 px as at 128 px), so that
    ``trainer.max_time`` still ends them.

    Args:
        out: run folder (data in ``out/data``, the grown BLIP in ``out/work/blip``, stage runs in ``out/STAGE``).
        settings: the starting pipeline's resolved settings (``caption_scale``: the adapted pipeline's).
        data: what :func:`prepare_data` returned.
        minutes: training time shared by the stages (lanes side by side).
        scale: extra factor on the step counts (below 1: a smoke run).
    """
    from autoseg.models.enhancer import load_enhancer

    seg = settings["segmenter"]
    if seg["name"] != "clipseg":
        raise ValueError(f"segmenter {seg['name']!r}: the adapt recipe fine-tunes clipseg pipelines only")
    roots = {"train": {"dataset": "folder", "root": str(out / "data" / "train")}}
    roots["val"] = {"dataset": "folder", "root": str(out / "data" / "val")}
    configs = {}
    for stage in ("captioner", "segmenter", "enhancer"):
        cfg = yaml.safe_load((CONFIGS / f"{stage}.yaml").read_text(encoding="utf-8"))
        tr, args = cfg["trainer"], cfg["model"]["init_args"]
        side = cfg["data"]["image_size"] / settings["caption_scale"] if stage in SCALED_STAGES else 1.0
        steps = max(4, round(tr["max_steps"] * side * minutes / NOMINAL_MINUTES * scale))
        tr["max_steps"], tr["val_check_interval"] = steps, max(2, min(tr["val_check_interval"], steps // 2))
        tr["max_time"] = _hms(SHARE[stage] * minutes * 60 * TIME_MARGIN)
        tr["default_root_dir"] = str(out / stage)
        logger = {"save_dir": str(out / stage), "name": "lightning_logs", "version": 0}
        tr["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": logger}
        for cb in tr["callbacks"]:
            if cb["class_path"].endswith("ModelCheckpoint") and "every_n_train_steps" in cb["init_args"]:
                cb["init_args"]["every_n_train_steps"] = max(1, min(cb["init_args"]["every_n_train_steps"], steps))
        cfg["data"].update(roots)
        if stage == "captioner":
            args.update(blip=str(out / "work" / "blip"), caption_mode=settings["caption"]["mode"])
            args.update(prompt=settings["caption"]["prompt"], caption_scale=settings["caption_scale"])
            args.update(aux_class_weights=data.get("feature_weights"))
            cfg["data"]["image_size"] = settings["caption_scale"]
        elif stage == "segmenter":
            args.update(segmenter=seg["source"], templates=seg["templates"], class_weights=data["class_weights"])
            args.update(patch_class_weights=data.get("feature_weights"))
            cfg["data"]["image_size"] = seg["image_size"]
        else:
            if settings.get("enhancer") is None:
                continue  # a pipeline without an enhancer keeps none
            head = load_enhancer(settings["enhancer"]).config
            args.update(blip=str(export_dir(out, "captioner", "blip", check=False)), head_width=head.width)
            args.update(head_depth=head.depth, head_block=head.block, head_heads=head.num_heads)
            args.update(head_mlp_ratio=head.mlp_ratio, head_pos_dim=head.pos_dim)
            next(c for c in tr["callbacks"] if c["class_path"].endswith("InitEnhancer"))["init_args"]["path"] = str(
                settings["enhancer"]
            )
            cfg["data"]["image_size"] = settings["caption_scale"]
        configs[stage] = cfg
    return configs


# ----------------------------------------------------------------------------------------------------- figures


def score(config: Path, root: Path, report: Path, mapper: str) -> dict[str, Any]:
    """mIoU and per-class IoU of a pipeline YAML on a folder dataset (``eval.py``, report written to ``report``)."""
    figures = eval_pipeline(config, root, report, mapper)
    return {"mIoU": figures["mIoU"], "per_class": figures["per_class"]}


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def adapt_markdown(result: dict[str, Any]) -> str:
    """The markdown page of ``adapt.json``: per-class IoU before and after on each scored set, and stage times."""
    sets = [s for s in ("val", "old_val") if s in result.get("figures", {})]
    new = set(result.get("new_classes", []))
    lines = [f"# Adapted `{result.get('from', '?')}` to `{result.get('data', '?')}`", ""]
    if result.get("new_words"):
        lines += [f"Words added to the captioner's vocabulary: {', '.join(result['new_words'])}.", ""]
    if sets:
        head = " | ".join(f"{s} before | {s} after" for s in sets)
        lines += [f"| class | {head} |", "|---|" + "---|" * (2 * len(sets))]
        names: dict[str, None] = {}
        for s in sets:
            for when in ("before", "after"):
                names.update(dict.fromkeys(result["figures"][s][when]["per_class"]))
        for name in names:
            cells = [
                _cell(result["figures"][s][when]["per_class"].get(name)) for s in sets for when in ("before", "after")
            ]
            lines.append(f"| {name}{' (new)' if name in new else ''} | {' | '.join(cells)} |")
        cells = [_cell(result["figures"][s][when]["mIoU"]) for s in sets for when in ("before", "after")]
        lines += [f"| **mIoU** | {' | '.join(f'**{c}**' for c in cells)} |", ""]
    if result.get("seconds"):
        lines += ["| stage | minutes |", "|---|---|"]
        lines += [f"| {k} | {v / 60:.1f} |" for k, v in result["seconds"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- running


def last_checkpoint(out: Path, stage: str) -> Path:
    """Where a stage keeps its latest state (``--resume`` continues from it)."""
    return out / stage / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


def run_stage(out: Path, stage: str, resume: bool, threads: int | None, in_process: bool = True) -> None:
    """Train one stage with ``OUT/configs/STAGE.yaml``; with ``resume``, continue from its ``last.ckpt`` if any."""
    ckpt = last_checkpoint(out, stage)
    cont = resume and ckpt.is_file()
    args = [f"--ckpt_path={ckpt}"] if cont else []
    log = out / "logs" / f"{stage}.log"
    print(f"[adapt] {stage}: {'resumed' if cont else 'started'}, log {log}", flush=True)
    run_train(out / "configs" / f"{stage}.yaml", out / stage, log, args, threads, fresh=not cont, in_process=in_process)


def assemble(out: Path, settings: dict[str, Any], has_enhancer: bool, mask_padding: bool, source: str) -> Path:
    """``OUT/pipeline.yaml`` with the adapted models in ``OUT/models/``."""
    settings = json.loads(json.dumps(settings))
    settings["caption"]["mask_padding"] = mask_padding
    yaml_path = out / "pipeline.yaml"
    pipeline = copy_models(
        yaml_path,
        out / "models",
        export_dir(out, "captioner", "blip"),
        export_dir(out, "segmenter", "segmenter"),
        export_dir(out, "enhancer", "enhancer.safetensors") if has_enhancer else None,
        settings,
    )
    header = f"# `{source}` adapted by `python -m autoseg.recipes.adapt` (configs of every stage in ./configs/).\n"
    return dump_pipeline(yaml_path, pipeline, header)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autoseg.recipes.adapt", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="starting pipeline: a preset name, a pipeline YAML, a saved pipeline folder or a Hub repo id",
    )
    p.add_argument("--data", type=Path, required=True, help="folder dataset: classes.txt, images/, masks/ [captions/]")
    p.add_argument("--out", type=Path, required=True, help="run folder (pipeline.yaml, models/, configs/, adapt.json)")
    p.add_argument("--minutes", type=float, default=NOMINAL_MINUTES, help="training time, shared by the stages")
    p.add_argument("--val", type=Path, help="held-out folder dataset of the new domain, scored before and after")
    p.add_argument("--old-val", type=Path, help="folder dataset of the starting domain, scored before and after")
    p.add_argument("--replay", type=Path, help="folder dataset of the starting domain mixed into the training data")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out (finished stages skipped)")
    p.add_argument("--mapper", default="embedding", help="eval.py name mapper of the scores (default: embedding)")
    p.add_argument("--mask-padding", choices=("true", "false"), default="true", help="caption.mask_padding to ship")
    p.add_argument(
        "--caption-scale",
        type=int,
        help="scale (one of the starting pipeline's scales) to caption at and to train the captioner at "
        "(default: the finest)",
    )
    p.add_argument("--jobs", type=int, default=2, help="training lanes run at once (1: one stage after another)")
    p.add_argument("--seed", type=int, default=0, help="caption templates' seed")
    p.add_argument("--scale", type=float, default=1.0, help="extra factor on the step counts (0.01: smoke run)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_arg_parser()
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.jobs < 1:
        p.error(f"--minutes {args.minutes} and --jobs {args.jobs} must be positive")
    for name in ("data", "val", "old_val", "replay"):
        folder = getattr(args, name)
        if folder is not None and not (folder / "classes.txt").is_file():
            p.error(f"--{name.replace('_', '-')} {folder}: not a folder dataset (classes.txt, images/, masks/)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (out / "adapt.json").unlink(missing_ok=True)
    log = StageLog(out / "adapt.json")
    start_yaml, settings = starting_pipeline(args.source)
    done = set(log.data.get("done", []))
    logged = log.data.get("caption_scale")  # a resumed run keeps the scale its configs were written for
    if logged is not None and args.caption_scale not in (None, logged):
        p.error(f"--caption-scale {args.caption_scale}: {out} was started with {logged}; resume with that")
    try:
        settings["caption_scale"] = pick_caption_scale(settings, args.caption_scale or logged)
    except ValueError as e:
        p.error(f"--caption-scale: {e}")
    log.update(caption_scale=settings["caption_scale"])
    log.update(**{"from": args.source, "data": str(args.data), "minutes": args.minutes, "done": sorted(done)})

    def finish(stage: str) -> None:
        done.add(stage)
        log.update(done=sorted(done))

    t0 = time.perf_counter()
    if "data" not in done:

        def data_stage() -> None:
            known = known_classes(settings["blip"])
            log.update(dataset=prepare_data(args.data, out / "data", args.seed, args.replay, known))

        log.timed("data", data_stage)
        finish("data")
    classes = log.data["dataset"]["classes"]
    if "vocabulary" not in done:

        def vocabulary() -> None:
            words = grow_blip(settings["blip"], classes, out / "work" / "blip")
            configs = stage_configs(out, settings, log.data["dataset"], args.minutes, args.scale)
            for stage, cfg in configs.items():
                dump_pipeline(out / "configs" / f"{stage}.yaml", cfg, f"# {stage} stage of {out}, written by adapt\n")
            log.update(new_words=words, new_classes=log.data["dataset"].get("new_classes", []))

        log.timed("vocabulary", vocabulary)
        finish("vocabulary")
    has_enhancer = (out / "configs" / "enhancer.yaml").is_file()
    lanes = [[s for s in lane if s not in done and (s != "enhancer" or has_enhancer)] for lane in LANES]
    in_process = args.jobs == 1 or sum(1 for lane in lanes if lane) < 2  # lanes side by side: a process each

    def train(stage: str, threads: int) -> None:
        run_stage(out, stage, args.resume, threads, in_process)
        finish(stage)

    failures = run_lanes(lanes, train, log, args.jobs)
    if failures:
        for e in failures:
            print(f"[adapt] {e}", file=sys.stderr)
        print("[adapt] rerun with --resume to continue", file=sys.stderr)
        return 1
    mask_padding = args.mask_padding == "true"
    log.timed("assemble", lambda: assemble(out, settings, has_enhancer, mask_padding, args.source))
    figures: dict[str, Any] = dict(log.data.get("figures", {}))

    def evaluate() -> None:
        for name, root in (("val", args.val), ("old_val", args.old_val)):
            if root is not None:
                figures[name] = {
                    when: score(cfg, root, out / "eval" / name / when / "report.json", args.mapper)
                    for when, cfg in (("before", start_yaml), ("after", out / "pipeline.yaml"))
                }
                log.update(figures=figures)

    if args.val is not None or args.old_val is not None:
        log.timed("evaluate", evaluate)
    log.update(wall_minutes=round((time.perf_counter() - t0) / 60, 1), pipeline=str(out / "pipeline.yaml"))
    atomic_write_text(out / "adapt.md", adapt_markdown(log.data))
    print(f"[adapt] pipeline: {out / 'pipeline.yaml'}; figures: {out / 'adapt.md'}")
    print(adapt_markdown(log.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
