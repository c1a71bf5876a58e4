"""What the recipes share: running a training stage, running lanes of stages side by side with timings, copying
exports into a pipeline folder with its YAML, and scoring a pipeline on a folder dataset.

A stage is a call of :func:`autoseg.lit.trainer.run` (``train.py``'s argv) that returns its figures as data. With one
lane at a time it runs in this process; lanes side by side each run their stages in a worker process of their own,
because a Lightning run seeds the process's random generators and sets its torch threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from autoseg.utils.io import atomic_write_json

REPO = Path(__file__).resolve().parents[2]


def export_dir(out: Path, stage: str, kind: str, which: str = "best", check: bool = True) -> Path:
    """The ``which`` export (best or last) of a stage run into ``out/STAGE`` (``kind``: blip, segmenter or
    enhancer.safetensors); ``check``: fail when it is not there (yet)."""
    path = out / stage / "lightning_logs" / "version_0" / "export" / which / kind
    if check and not path.exists():
        raise FileNotFoundError(f"{path}: stage {stage!r} has no export yet; run it first")
    return path


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_train(
    config: Path,
    root: Path,
    log: Path,
    args: Sequence[str] = (),
    threads: int | None = None,
    fresh: bool = True,
    subcommand: str = "fit",
    in_process: bool = True,
) -> dict[str, Any]:
    """One ``train.py SUBCOMMAND -c CONFIG`` run into ``root`` (emptied first when ``fresh``), its output to ``log``.

    Args:
        threads: torch threads of the run (lanes side by side share the cores).
        in_process: run here; False: in a fresh worker process (lanes side by side).

    Returns:
        the run's :class:`autoseg.lit.trainer.RunResult` as a dict (``metrics``, ``best_score``, ``exports``, ...).

    Raises:
        RuntimeError: the run failed; the message holds the error and the end of its log.
    """
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    argv = [subcommand, "-c", str(config), f"--trainer.default_root_dir={root}", *args]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w" if fresh else "a", encoding="utf-8") as f:
        f.write("train.py " + " ".join(argv) + "\n")
    try:
        if in_process:
            return run_logged(argv, log, threads)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(run_logged, argv, log, threads).result()
    except Exception as e:  # noqa: BLE001 - any failure of the stage is reported with its log
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"stage {root.name} failed ({type(e).__name__}: {e}); the end of {log}:\n{tail}") from e


def run_logged(argv: Sequence[str], log: Path, threads: int | None = None) -> dict[str, Any]:
    """:func:`autoseg.lit.trainer.run` with everything it prints appended to ``log``; returns its result as a dict."""
    import torch

    from autoseg.lit.trainer import run

    if threads is not None:
        torch.set_num_threads(threads)
    with open(log, "a", encoding="utf-8") as f, output_to(f):
        try:
            return dataclasses.asdict(run(list(argv)))
        except SystemExit as e:  # LightningCLI's usage errors
            raise RuntimeError(f"train.py {' '.join(argv)}: usage error (exit {e.code})") from None


@contextlib.contextmanager
def output_to(stream) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so logging and C code too) to ``stream``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class StageLog:
    """A JSON run log (``seconds`` per finished stage, anything else the recipe stores), written after each change.

    Args:
        path: the JSON file (read back when it exists, so a resumed run keeps earlier timings).
    """

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("seconds", {})
        self.lock = threading.Lock()

    def update(self, **items: Any) -> None:
        """Set top-level items and write the file."""
        with self.lock:
            self.data.update(items)
            atomic_write_json(self.path, self.data)

    def timed(self, stage: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` and record its wall-clock seconds under ``seconds[stage]``."""
        t0 = time.perf_counter()
        fn()
        with self.lock:
            self.data["seconds"][stage] = round(time.perf_counter() - t0, 1)
            atomic_write_json(self.path, self.data)
        print(f"[recipe] {stage}: done in {self.data['seconds'][stage] / 60:.1f} min", flush=True)


def run_lanes(
    lanes: Sequence[Sequence[str]], run: Callable[[str, int], object], log: StageLog, jobs: int, cpus: int | None = None
) -> list[BaseException]:
    """Run each lane's stages in order (``run(stage, threads)``, timed into ``log``), up to ``jobs`` lanes at once.

    A stage gets its share of the cores when it starts: ``cpus // min(jobs, lanes not finished)`` threads (at least
    1), so the stages left after a lane ends use the cores it frees.

    Returns:
        the exceptions of failed lanes (a lane stops at its first failure; the others go on).
    """
    cpus = cpus or cores()
    unfinished = [sum(1 for stages in lanes if stages)]
    lock = threading.Lock()

    def lane(stages: Sequence[str]) -> None:
        try:
            for stage in stages:
                with lock:
                    threads = max(1, cpus // max(1, min(jobs, unfinished[0])))
                log.timed(stage, lambda s=stage, t=threads: run(s, t))
        finally:
            with lock:
                unfinished[0] -= 1

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(lane, stages) for stages in lanes if stages]
        return [e for e in (f.exception() for f in futures) if e is not None]


def copy_models(
    yaml_path: Path, models: Path, blip: Path, segmenter: Path, enhancer: Path | None, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Copy the models into ``models/`` and return the pipeline settings with ``./`` paths relative to ``yaml_path``.

    Args:
        yaml_path: where the pipeline YAML will be written (see :func:`dump_pipeline`).
        models: the folder the models are copied into (a fresh one; a sub-folder of the YAML's folder).
        blip: BLIP ``save_pretrained`` directory.
        segmenter: segmenter ``save_pretrained`` directory.
        enhancer: enhancer safetensors (None: no enhancer).
        settings: the other pipeline settings (``segmenter`` holds the segmenter's settings but its source).
    """
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    shutil.copytree(blip, models / "blip")
    shutil.copytree(segmenter, models / "segmenter")
    rel = "./" + models.relative_to(yaml_path.parent).as_posix() if models != yaml_path.parent else "."
    pipeline: dict[str, Any] = {"blip": f"{rel}/blip"}
    if enhancer is not None:
        shutil.copy2(enhancer, models / "enhancer.safetensors")
        pipeline["enhancer"] = f"{rel}/enhancer.safetensors"
    pipeline |= {k: v for k, v in settings.items() if k not in ("blip", "enhancer")}
    pipeline["segmenter"] = {**settings.get("segmenter", {}), "source": f"{rel}/segmenter"}
    return pipeline


def dump_pipeline(yaml_path: Path, pipeline: Mapping[str, Any], header: str) -> Path:
    """Write a pipeline YAML with a comment header."""
    yaml_path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path.write_text(header + yaml.safe_dump(dict(pipeline), sort_keys=False), encoding="utf-8")
    return yaml_path


def eval_pipeline(config: Path, root: Path, report: Path, mapper: str = "embedding") -> dict[str, Any]:
    """Score a pipeline (YAML or folder) on a folder dataset as ``eval.py`` does (predictions beside the report);
    returns the report."""
    from autoseg.api import resolve_config
    from autoseg.config import to_dict
    from autoseg.data.datasets import build_dataset
    from autoseg.evaluate import evaluate_predictions, write_reports
    from autoseg.lave import build_mapper
    from autoseg.outputs import RunManifest
    from autoseg.run import segment_into

    settings, _ = resolve_config(config)
    dataset = build_dataset("folder", str(root))
    predictions = report.with_name(report.stem + "_predictions")
    files = [(Path(s.image), Path(s.name)) for s in dataset.samples]
    with RunManifest(predictions, {"config": to_dict(settings)}) as run:
        segment_into(settings, files, run, progress=False)
    result = evaluate_predictions(predictions, dataset, build_mapper(mapper), progress=False, mapper_name=mapper)
    write_reports(result, report)
    return result
