"""The one run loop: files in -> pipeline -> the one writer, in one process or on several devices.

``infer.py``, ``eval.py`` (pipeline mode), the recipes and Lightning's ``predict`` go through here:
:func:`segment_into` segments ``(file, output stem)`` pairs into a :class:`autoseg.outputs.RunManifest`'s folder,
either here (:func:`segment_files`) or with ``devices x num_nodes`` processes (:mod:`autoseg.lit.predictor`). Every
image's outputs are committed together by :class:`autoseg.outputs.SegmentationWriter`; a bad file is recorded and
skipped; a killed run resumes with ``skip_existing``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from autoseg.config import PipelineConfig
from autoseg.outputs import OutputWriteError, RunManifest, SegmentationWriter, plan_outputs
from autoseg.utils.io import DEFAULT_MAX_PIXELS, ImageReadError, load_image


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


def segment_files(
    pipeline,
    files: Sequence[tuple[Path, Path]],
    run: RunManifest,
    skip_existing: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[dict]:
    """Segment ``(file, output stem)`` pairs into ``run.out_dir`` in this process; one manifest entry per file.

    A file that cannot be read or segmented is recorded with ``status: error`` and a reason; the others are still
    written. Each image's outputs are committed together, its status is appended to ``manifest.jsonl`` at once and
    ``manifest.json`` is written at the start and the end, so a killed run loses nothing it finished and resumes with
    ``skip_existing``. A full disk stops the run with :class:`autoseg.outputs.OutputWriteError` after recording what
    was done.

    Args:
        pipeline: an :class:`autoseg.pipeline.AutoSegPipeline` (its ``batch_size`` sets the batches).
        run: the entered :class:`RunManifest` of the output folder.
    """
    entries, todo = plan_outputs(files, run.out_dir, skip_existing)
    run.start(entries)
    writer = SegmentationWriter(run.out_dir, run)
    batch_size = pipeline.batch_size
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
            writer(pipeline.predict, batch)
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
    config: PipelineConfig,
    files: Sequence[tuple[Path, Path]],
    run: RunManifest,
    devices: int = 1,
    num_nodes: int = 1,
    skip_existing: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[dict] | None:
    """Segment ``files`` into ``run.out_dir`` here, or on ``devices`` x ``num_nodes`` processes through Lightning.

    Args:
        config: a checked config (:func:`autoseg.api.resolve_config`); the models load here, after the caller has
            checked everything else.

    Returns:
        the manifest entries, or None in the helper processes of a multi-device run (rank > 0).
    """
    if devices * num_nodes > 1:
        from autoseg.lit.predictor import predict_on_devices

        return predict_on_devices(config, files, run, devices, num_nodes, skip_existing, max_pixels, progress)
    from autoseg.api import build_pipeline

    pipeline = build_pipeline(config, checked=True)
    return segment_files(pipeline, files, run, skip_existing, max_pixels, progress)


def launch_rank(devices: int, num_nodes: int) -> int:
    """This process's global rank in a ``devices`` x ``num_nodes`` run, from the launcher's environment (0: first).

    Lightning's launcher re-runs the command with ``LOCAL_RANK`` set; torchrun and SLURM set ``RANK``/``SLURM_PROCID``.
    """
    if devices * num_nodes == 1:
        return 0
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return int(os.environ.get("NODE_RANK", 0)) * devices + int(os.environ.get("LOCAL_RANK", 0))
