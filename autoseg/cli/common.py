"""Flags shared by the command lines (``infer.py``, ``eval.py``, ``python -m autoseg.app``) and their exit codes."""

from __future__ import annotations

import argparse

from autoseg.utils.io import DEFAULT_MAX_PIXELS

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
PIPELINE_FLAGS = ("blip", "enhancer", "seed", "device", "dtype", "batch_size", "max_names")


def add_pipeline_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags that choose and configure the pipeline."""
    from autoseg.models.segmenters import BACKENDS  # the backends' names, for --segmenter-backend

    g = p.add_argument_group("pipeline")
    g.add_argument(
        "--config",
        metavar="SOURCE",
        help="the pipeline: a YAML (see configs/pipeline/), a folder written by save_pretrained, a preset name or a "
        "Hugging Face repo id holding such a folder",
    )
    g.add_argument(
        "--preset",
        metavar="NAME",
        help="a pipeline shipped with AutoSeg (autoseg/presets/NAME/) instead of --config",
    )
    g.add_argument("--blip", metavar="SOURCE", help="BLIP captioner: Hugging Face id, local directory or scratch:NAME")
    g.add_argument(
        "--segmenter", metavar="SOURCE", help="segmenter weights: Hugging Face id, local directory or scratch:NAME"
    )
    g.add_argument(
        "--segmenter-backend",
        choices=list(BACKENDS),
        help="; ".join(f"{name}: {b.summary}" for name, b in BACKENDS.items())
        + " (README: choosing a segmenter); with its default model unless --segmenter is given",
    )
    g.add_argument(
        "--enhancer",
        metavar="SAFETENSORS",
        help="trained embedding-enhancer head (train.py fit exports it as export/{best,last}/enhancer.safetensors)",
    )
    g.add_argument("--seed", type=int, help="seed for clustering and caption sampling (default 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="model dtype (half precision is for GPUs; it runs on a CPU, slowly without half-precision units)",
    )
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


def add_device_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--devices`` / ``--num-nodes``: share the inputs between processes (Lightning DDP)."""
    g = p.add_argument_group("multi-device")
    g.add_argument(
        "--devices", type=int, default=1, metavar="N", help="processes per node, one per GPU (on CPU: N processes)"
    )
    g.add_argument("--num-nodes", type=int, default=1, metavar="M", help="machines (torchrun / SLURM; default 1)")
    return p


def pipeline_source(args: argparse.Namespace, default: str | None = None) -> str | None:
    """What ``--config`` / ``--preset`` name (``default`` when neither is given)."""
    if args.config is not None and args.preset is not None:
        raise ValueError("give either --config or --preset, not both")
    if args.preset is not None:
        from autoseg.config import preset_path

        preset_path(args.preset)  # an unknown name lists the presets
        return args.preset
    return args.config if args.config is not None else default


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The pipeline flags given, as :func:`autoseg.load` keyword arguments."""
    kwargs = {key: getattr(args, key) for key in PIPELINE_FLAGS if getattr(args, key) is not None}
    if args.segmenter_backend is not None:
        kwargs["segmenter_backend"] = args.segmenter_backend
    if args.segmenter is not None:
        kwargs["segmenter"] = args.segmenter
    return kwargs


def config_from_args(args: argparse.Namespace, default_source: str | None = None):
    """The checked pipeline config: ``--config``/``--preset`` with the flags on top (no weights are loaded).

    Raises:
        autoseg.config.ConfigError: a bad value (one line naming it, its source and what is allowed).
        FileNotFoundError / ValueError: a source that does not exist.
    """
    from autoseg.api import overrides_from_kwargs, resolve_config

    overrides = overrides_from_kwargs(overrides_from_args(args))
    config, _ = resolve_config(pipeline_source(args, default_source), overrides, "command line")
    return config


def check_run_args(args: argparse.Namespace) -> None:
    """Numbers of the run flags shared by infer.py and eval.py (pipeline mode)."""
    for flag, value in (
        ("--max-pixels", args.max_pixels),
        ("--devices", args.devices),
        ("--num-nodes", args.num_nodes),
    ):
        if value < 1:
            raise ValueError(f"{flag} must be a positive number, got {value}")
