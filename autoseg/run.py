"""The one run loop: files or clips in -> pipeline -> the one writer, in one process or on several devices.

``infer.py``, ``eval.py`` (pipeline mode), the recipes and Lightning's ``predict`` go through here:
:func:`segment_into` segments ``(file, output stem)`` pairs into a :class:`autoseg.outputs.RunManifest`'s folder,
either here (:func:`segment_files`) or with ``devices x num_nodes`` processes (:mod:`autoseg.lit.predictor`). Every
image's outputs are committed together by :class:`autoseg.outputs.SegmentationWriter`; a bad file is recorded and
skipped; a killed run resumes with ``skip_existing``. :func:`segment_inputs` runs images and then clips
(:mod:`autoseg.video.run`) into one folder, every one of them listed in the same manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from itertools import chain, count
from pathlib import Path

from tqdm import tqdm

from autoseg.config import PipelineConfig
from autoseg.outputs import OutputWriteError, RunManifest, SegmentationWriter, plan_outputs
from autoseg.utils.io import DEFAULT_MAX_PIXELS, ImageReadError, load_image

log = logging.getLogger(__name__)


def _free_name(stem: Path, extension: str, taken: Callable[[str], bool]) -> Path:
    """``stem`` if it is not taken, else ``stem_EXT`` (the input's extension, when it has one), else ``stem_2``,
    ``stem_3``, ... : the first name not taken (names compared as POSIX paths)."""
    tries = [stem, stem.with_name(f"{stem.name}_{extension}")] if extension else [stem]
    numbered = (stem.with_name(f"{stem.name}_{n}") for n in count(2))
    return next(s for s in chain(tries, numbered) if not taken(s.as_posix()))


def unique_stems(found: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Relative output stems; a clash (``a.jpg`` and ``a.png``) keeps the extension in the later name."""
    used: set[str] = set()
    stems = []
    for file, stem in found:
        s = _free_name(Path(stem), file.suffix.lstrip("."), used.__contains__)
        used.add(s.as_posix())
        stems.append(s)
    return stems


def unique_clip_names(image_stems: Sequence[Path], clips: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Output names for clips ``(video file or frames folder, name)`` that share no file with the images' outputs
    (``image_stems``, already unique) or with each other.

    Clip ``N`` writes ``N.json``, ``N.partial.json``, ``N_overlay.mp4`` and ``N/000000.png ...`` (see
    :mod:`autoseg.video.outputs`); image ``S`` writes ``S.json``, ``S.png``, ``S_overlay.jpg``. So a name is taken by
    an image of that stem (``a.png`` and ``a.mp4`` would both write ``a.json``) or of stem ``N.partial``, by an image
    ``N/DDDDDD`` (six digits: a label map's name), and by a clip ``N``, ``N.partial`` or (for ``N = M.partial``)
    ``M``. As for clashing images, the images keep their names and the clip keeps its extension (``a_mp4``), else a
    number (``a_2``); names are the same on every run over the same inputs (``--skip-existing`` finds them).
    """
    images = {Path(s).as_posix() for s in image_stems}
    frame_folders = {Path(s).parent.as_posix() for s in image_stems if re.fullmatch(r"\d{6}", Path(s).name)}
    clip_names: set[str] = set()

    def taken(name: str) -> bool:
        partial = name.endswith(".partial") and name[: -len(".partial")] in clip_names
        return partial or name in images | clip_names | frame_folders or f"{name}.partial" in images | clip_names

    names = []
    for path, name in clips:
        chosen = _free_name(Path(name), Path(path).suffix.lstrip(".") if Path(path).is_file() else "", taken)
        clip_names.add(chosen.as_posix())
        names.append(chosen)
    return names


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


def segment_inputs(
    pipeline,
    files: Sequence[tuple[Path, Path]],
    clips: Sequence,
    run: RunManifest,
    clip_options,
    skip_existing: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> list[dict]:
    """Segment images (as :func:`segment_files`) and then clips into ``run.out_dir``, in this process.

    Every clip is listed in the manifest from the start (``pending``, ``"kind": "clip"``) and gets its final status
    line as soon as it is done: ``{"input", "output", "kind": "clip", "status": "ok", "frames": N, "vocabulary"}``
    (with ``"skipped": true`` for a clip ``skip_existing`` kept), or ``"status": "error"`` with a reason. The run is
    ``complete`` once every image and clip has a status.

    Args:
        clips: :class:`autoseg.utils.video.ClipSource` objects, named apart from the images
            (:func:`unique_clip_names`).
        clip_options: the clips' :class:`autoseg.video.run.ClipOptions`.

    Returns:
        the manifest entries, images first.
    """
    from autoseg.video.outputs import ClipOutputs
    from autoseg.video.run import clip_tracker, segment_clip

    clip_entries = [
        {"input": str(c.path), "output": Path(c.name).as_posix(), "kind": "clip", "status": "pending"} for c in clips
    ]
    run.add(clip_entries)
    entries = segment_files(pipeline, files, run, skip_existing, max_pixels, progress)
    tracker = clip_tracker(pipeline, clip_options, list(clips))
    for source, entry in zip(clips, clip_entries, strict=True):
        try:
            entry.update(segment_clip(pipeline, source, run.out_dir, clip_options, skip_existing, tracker))
        except Exception as e:
            entry.update(status="error", reason=f"{source.path}: {type(e).__name__}: {e}")
            run.record(entry)
            raise
        if entry["status"] == "ok":
            record = json.loads(ClipOutputs(run.out_dir, source.name).record.read_text(encoding="utf-8"))
            entry.update(frames=len(record["frames"]), vocabulary=record["vocabulary"])
        note = f" ({entry['reason']})" if "reason" in entry else " (kept)" if entry.get("skipped") else ""
        log.info("clip %s: %s%s", source.name, entry["status"], note)
        run.record(entry)
    run.finish()
    return entries + clip_entries


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
