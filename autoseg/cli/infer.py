"""``infer.py``: segment images with an automatically found vocabulary and write label maps, JSON and overlays."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from autoseg.config import load_config, preset_path, to_dict
from autoseg.config_checks import check_runtime
from autoseg.models.loading import ModelLoadError
from autoseg.outputs import RunManifest, prediction_complete, write_prediction
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
    g.add_argument(
        "--enhancer",
        metavar="SAFETENSORS",
        help="trained embedding-enhancer head (train.py fit exports it as export/{best,last}/enhancer.safetensors)",
    )
    g.add_argument("--seed", type=int, help="seed for clustering and caption sampling (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (float32 on CPU)")
    g.add_argument("--batch-size", type=int, help="images per batch (default 4)")
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
    return add_pipeline_args(p)


def overrides_from_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    for key in ("blip", "enhancer", "seed", "device", "dtype", "batch_size"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.segmenter is not None:
        out["segmenter"] = {"source": args.segmenter}
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
    from autoseg.models.enhancer import load_enhancer
    from autoseg.pipeline import AutoSegPipeline

    enhancer = load_enhancer(config.enhancer) if config.enhancer else None
    pipeline = AutoSegPipeline.from_config(config, enhancer=enhancer)
    if enhancer is not None and enhancer.dim != pipeline.captioner.hidden_size:
        raise ValueError(
            f"enhancer {config.enhancer} was trained on {enhancer.dim}-d BLIP tokens but BLIP {config.blip} has "
            f"{pipeline.captioner.hidden_size}-d tokens; use the BLIP it was trained with"
        )
    return pipeline


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
    """Segment ``(file, output stem)`` pairs into ``out_dir``; returns one manifest entry per file.

    A file that cannot be read or segmented is recorded with ``status: error`` and a reason; the others are still
    written. Each image's outputs are committed together (:func:`autoseg.outputs.write_prediction`), its status is
    appended to ``manifest.jsonl`` at once and ``manifest.json`` is written at the start and the end
    (:class:`autoseg.outputs.RunManifest`), so a killed run loses nothing it finished and resumes with
    ``skip_existing``. A full disk stops the run with :class:`OutputWriteError` after recording what was done.

    Args:
        run: an entered :class:`RunManifest` for ``out_dir`` (None: lock the folder here).
    """
    if run is None:
        with RunManifest(out_dir, manifest_extra) as run:
            return predict_files(
                pipeline, files, out_dir, batch_size, skip_existing, progress=progress, max_pixels=max_pixels, run=run
            )
    entries: list[dict] = []
    todo: list[tuple[Path, Path, dict]] = []
    for file, stem in files:
        entry = {"input": str(file), "output": Path(stem).as_posix(), "status": "pending"}
        entries.append(entry)
        vocabulary = prediction_complete(out_dir, stem) if skip_existing else None
        if vocabulary is not None:
            entry.update(status="ok", skipped=True, vocabulary=vocabulary)
        else:
            todo.append((file, stem, entry))
    run.start(entries)

    bar = tqdm(total=len(todo), desc="segmenting", unit="img", disable=None if progress else True)
    try:
        for start in range(0, len(todo), batch_size):
            batch = []
            for file, stem, entry in todo[start : start + batch_size]:
                try:
                    batch.append((load_image(file, max_pixels), file, stem, entry))
                except ImageReadError as e:
                    entry.update(status="error", reason=str(e))
                    run.record(entry)
                    log.warning("skipped %s", e)
                    bar.update(1)
            _run_batch(pipeline, batch, out_dir, run)
            bar.update(len(batch))
    except OutputWriteError:
        with contextlib.suppress(OSError):
            run.finish(complete=False)
        raise
    finally:
        bar.close()
    run.finish()
    return entries


def main(argv: Sequence[str] | None = None) -> int:
    """Run inference; returns 0 when every input succeeded, 1 when some failed, 2 on usage/setup errors.

    Everything that can be checked without the models (inputs, config, output folder, its lock) is checked before
    they load.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.ExitStack() as stack:
        try:
            if args.max_pixels < 1:
                raise ValueError(f"--max-pixels must be a positive number of pixels, got {args.max_pixels}")
            found = find_images(args.paths)
            if not found:
                raise ValueError(f"no files found in {' '.join(args.paths)}")
            config = config_from_args(args)
            out_dir = prepare_output_dir(args.output)
            run = stack.enter_context(RunManifest(out_dir, {"config": to_dict(config)}))
            pipeline = build_pipeline(config)
        except (FileNotFoundError, ValueError, ModelLoadError, OSError) as e:
            print(f"infer.py: error: {e}", file=sys.stderr)
            return EXIT_USAGE

        files = [(file, stem) for (file, _), stem in zip(found, unique_stems(found), strict=True)]
        try:
            entries = predict_files(
                pipeline, files, out_dir, config.batch_size, args.skip_existing, max_pixels=args.max_pixels, run=run
            )
        except OutputWriteError as e:
            print(f"infer.py: error: {e.strerror}", file=sys.stderr)
            return EXIT_SOME_FAILED
    failed = [e for e in entries if e["status"] != "ok"]
    print(f"{len(entries) - len(failed)} of {len(entries)} inputs segmented; outputs in {args.output}")
    for e in failed:
        print(f"  failed: {e.get('reason', e['input'])}", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


class OutputWriteError(OSError):
    """Outputs cannot be written at all (disk full, read-only file system): the run stops, finished sets are kept."""


FATAL_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _run_batch(pipeline, batch: list, out_dir: Path, run: RunManifest) -> None:
    """Segment a batch; if the batch fails, retry image by image so that one bad input costs only itself."""
    if not batch:
        return
    t0 = time.perf_counter()
    try:
        preds = pipeline([b[0] for b in batch])
    except Exception:  # noqa: BLE001 - isolate the failing image below
        if len(batch) > 1:
            for item in batch:
                _run_batch(pipeline, [item], out_dir, run)
            return
        _, file, _, entry = batch[0]
        log.exception("failed on %s", file)
        entry.update(status="error", reason=f"{file}: pipeline failed ({sys.exc_info()[1]!r})")
        run.record(entry)
        return
    seconds = (time.perf_counter() - t0) / len(batch)
    for (image, file, stem, entry), pred in zip(batch, preds, strict=True):
        try:
            pred.extra["seconds"] = round(seconds, 3)
            write_prediction(out_dir, stem, image, str(file), pred)
            entry.update(status="ok", vocabulary=pred.vocabulary)
        except OSError as e:
            entry.update(status="error", reason=f"{file}: could not write outputs ({e})")
            if e.errno in FATAL_WRITE_ERRORS:
                with contextlib.suppress(OSError):
                    run.record(entry)
                raise OutputWriteError(
                    e.errno,
                    f"cannot write to {out_dir} ({e.strerror}); the images finished "
                    "before are complete: make room and rerun with --skip-existing",
                ) from e
        run.record(entry)
