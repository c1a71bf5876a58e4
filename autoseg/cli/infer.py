"""``infer.py``: segment images with an automatically found vocabulary and write label maps, JSON and overlays."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from autoseg.config import load_config, preset_path, to_dict
from autoseg.config_checks import check_runtime
from autoseg.models.loading import ModelLoadError
from autoseg.outputs import OutputWriteError, RunManifest, SegmentationWriter, plan_outputs
from autoseg.utils.io import DEFAULT_MAX_PIXELS, ImageReadError, find_images, load_image, prepare_output_dir

log = logging.getLogger("autoseg.infer")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def add_pipeline_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags that choose and configure the pipeline (shared by infer.py and eval.py)."""
    g = p.add_argument_group("pipeline")
    g.add_argument("--config", type=Path, metavar="YAML", help="pipeline config (see configs/pipeline/)")
    g.add_argument(
        "--preset",
        metavar="NAME",
        help="a pipeline shipped with AutoSeg (autoseg/presets/NAME.yaml, models beside it) instead of --config",
    )
    g.add_argument("--blip", metavar="ID_OR_DIR", help="BLIP captioner: Hugging Face id or local directory")
    g.add_argument("--segmenter", metavar="ID_OR_DIR", help="segmenter weights: Hugging Face id or local directory")
    from autoseg.models.segmenters import SEGMENTERS  # the backends' names, for --segmenter-backend

    g.add_argument(
        "--segmenter-backend",
        choices=list(SEGMENTERS),
        help=f"segmenter backend: {', '.join(SEGMENTERS)} (README: choosing a segmenter); with its default model "
        "unless --segmenter is given",
    )
    g.add_argument(
        "--enhancer",
        metavar="SAFETENSORS",
        help="trained embedding-enhancer head (train.py fit exports it as export/{best,last}/enhancer.safetensors)",
    )
    g.add_argument("--seed", type=int, help="seed for clustering and caption sampling (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (float32 on CPU)")
    g.add_argument("--batch-size", type=int, help="images per batch (default 4)")
    g.add_argument("--max-names", type=int, metavar="N", help="keep the names of the N largest clusters (default all)")
    g.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"skip (and report) images of over N pixels, checked before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Name the things in each image and segment them (no class list needed). For each image IMG "
        "writes IMG.png (label map: 0 = unlabelled, i = i-th vocabulary name), IMG.json (vocabulary, pixel "
        "fractions, captions) and IMG_overlay.jpg, plus manifest.json for the whole run.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--skip-existing", action="store_true", help="keep outputs already in DIR, process the rest")
    return add_device_args(add_pipeline_args(p))


def add_device_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--devices`` / ``--num-nodes``: share the inputs between processes (Lightning DDP; shared by eval.py)."""
    g = p.add_argument_group("multi-device")
    g.add_argument(
        "--devices", type=int, default=1, metavar="N", help="processes per node, one per GPU (on CPU: N processes)"
    )
    g.add_argument("--num-nodes", type=int, default=1, metavar="M", help="machines (torchrun / SLURM; default 1)")
    return p


def overrides_from_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    for key in ("blip", "enhancer", "seed", "device", "dtype", "batch_size", "max_names"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.segmenter_backend is not None:  # another backend: its default model unless --segmenter names one
        out["segmenter"] = {"name": args.segmenter_backend, "source": None}
    if args.segmenter is not None:
        out.setdefault("segmenter", {})["source"] = args.segmenter
    return out


def unique_stems(found: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Relative output stems; a clash (``a.jpg`` and ``a.png``) keeps the extension in the later name."""
    used: set[str] = set()
    stems = []
    for file, stem in found:
        s = stem
        if str(s) in used:
            s = stem.with_name(f"{stem.name}_{file.suffix.lstrip('.')}")
        n = 2
        while str(s) in used:
            s, n = stem.with_name(f"{stem.name}_{n}"), n + 1
        used.add(str(s))
        stems.append(s)
    return stems


def config_from_args(args: argparse.Namespace):
    """The pipeline config: ``--config`` YAML (or the defaults) with the command-line flags on top, checked.

    Raises:
        autoseg.config.ConfigError: a bad value (types, ranges, device, dtype, scales vs the model's patch size; only
            the models' ``config.json`` files are read); the one-line message names it and what is allowed.
    """
    overrides = overrides_from_args(args)
    config = load_config(args.config, overrides, preset=args.preset, overrides_source="command line")
    source = str(args.config) if args.config else str(preset_path(args.preset)) if args.preset else "config"
    check_runtime(config, source, overrides, "command line")
    return config


def build_pipeline(config):
    """Load the models of ``config`` (heavy imports happen here, after the arguments are known to be good)."""
    from autoseg.pipeline import build_pipeline as load

    return load(config)


def predict_files(
    pipeline,
    files: Sequence[tuple[Path, Path]],
    out_dir: Path,
    batch_size: int,
    skip_existing: bool = False,
    manifest_extra: dict | None = None,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    run: RunManifest | None = None,
) -> list[dict]:
    """Segment ``(file, output stem)`` pairs into ``out_dir`` in this process; returns one manifest entry per file.

    A file that cannot be read or segmented is recorded with ``status: error`` and a reason; the others are still
    written. Each image's outputs are committed together (:func:`autoseg.outputs.write_prediction`), its status is
    appended to ``manifest.jsonl`` at once and ``manifest.json`` is written at the start and the end
    (:class:`autoseg.outputs.RunManifest`), so a killed run loses nothing it finished and resumes with
    ``skip_existing``. A full disk stops the run with :class:`autoseg.outputs.OutputWriteError` after recording what
    was done.

    Args:
        run: an entered :class:`RunManifest` for ``out_dir`` (None: lock the folder here).
    """
    if run is None:
        with RunManifest(out_dir, manifest_extra) as run:
            return predict_files(
                pipeline, files, out_dir, batch_size, skip_existing, progress=progress, max_pixels=max_pixels, run=run
            )
    entries, todo = plan_outputs(files, out_dir, skip_existing)
    run.start(entries)
    writer = SegmentationWriter(out_dir, run)
    bar = tqdm(total=len(todo), desc="segmenting", unit="img", disable=None if progress else True)
    try:
        for start in range(0, len(todo), batch_size):
            batch = []
            for file, stem, entry in todo[start : start + batch_size]:
                try:
                    batch.append((load_image(file, max_pixels), file, stem, entry))
                except ImageReadError as e:
                    writer.fail(entry, str(e))
                    bar.update(1)
            writer(pipeline, batch)
            bar.update(len(batch))
    except OutputWriteError:
        with contextlib.suppress(OSError):
            run.finish(complete=False)
        raise
    finally:
        bar.close()
    run.finish()
    return entries


def segment_into(
    args: argparse.Namespace, config, files: Sequence[tuple[Path, Path]], run: RunManifest, progress: bool = True
) -> list[dict] | None:
    """Segment ``files`` into ``run.out_dir`` in one process, or on ``--devices``/``--num-nodes`` through Lightning.

    Returns the manifest entries, or None in the helper processes of a multi-device run (rank > 0).
    """
    if args.devices * args.num_nodes > 1:
        from autoseg.lit.predictor import predict_on_devices

        return predict_on_devices(
            config, files, run, args.devices, args.num_nodes, args.skip_existing, args.max_pixels, progress
        )
    pipeline = build_pipeline(config)
    return predict_files(
        pipeline, files, run.out_dir, config.batch_size, args.skip_existing, max_pixels=args.max_pixels, run=run
    )


def check_run_args(args: argparse.Namespace) -> None:
    """Numbers of the run flags shared by infer.py and eval.py (pipeline mode)."""
    for flag, value in (
        ("--max-pixels", args.max_pixels),
        ("--devices", args.devices),
        ("--num-nodes", args.num_nodes),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be a positive number, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run inference; returns 0 when every input succeeded, 1 when some failed, 2 on usage/setup errors.

    Everything that can be checked without the models (inputs, config, output folder, its lock) is checked before
    they load.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.ExitStack() as stack:
        try:
            check_run_args(args)
            found = find_images(args.paths)
            if not found:
                raise ValueError(f"no files found in {' '.join(args.paths)}")
            config = config_from_args(args)
            out_dir = prepare_output_dir(args.output)
            run = stack.enter_context(RunManifest(out_dir, {"config": to_dict(config)}, rank=launch_rank(args)))
            files = [(file, stem) for (file, _), stem in zip(found, unique_stems(found), strict=True)]
            entries = segment_into(args, config, files, run)
        except OutputWriteError as e:
            print(f"infer.py: error: {e.strerror}", file=sys.stderr)
            return EXIT_SOME_FAILED
        except (FileNotFoundError, ValueError, ModelLoadError, OSError) as e:
            print(f"infer.py: error: {e}", file=sys.stderr)
            return EXIT_USAGE
    if entries is None:  # a helper process of a multi-device run: rank 0 reports
        return EXIT_OK
    failed = [e for e in entries if e["status"] != "ok"]
    print(f"{len(entries) - len(failed)} of {len(entries)} inputs segmented; outputs in {args.output}")
    for e in failed:
        print(f"  failed: {e.get('reason', e['input'])}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def launch_rank(args: argparse.Namespace) -> int:
    """This process's global rank in a ``--devices``/``--num-nodes`` run, from the launcher's environment (0: first).

    Lightning's launcher re-runs the command with ``LOCAL_RANK`` set; torchrun and SLURM set ``RANK``/``SLURM_PROCID``.
    """
    if args.devices * args.num_nodes == 1:
        return 0
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", 0)) * args.devices + int(os.environ.get("LOCAL_RANK", 0))
