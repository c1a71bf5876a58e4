"""``infer.py``: segment images with an automatically found vocabulary and write label maps, JSON and overlays."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from autoseg.cli.common import (
    EXIT_OK,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    add_device_args,
    add_pipeline_args,
    check_run_args,
    config_from_args,
)
from autoseg.export import FORMATS, check_destination, export_predictions
from autoseg.video import DEFAULT_MOTION, DEFAULT_SMOOTHING


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
    v = p.add_argument_group(
        "video (files .mp4 .webm .mov .mkv .avi are clips; outputs NAME/000000.png, NAME.json, NAME_overlay.mp4)"
    )
    v.add_argument("--clips", action="store_true", help="a folder of images is a clip of frames (so are sub-folders)")
    v.add_argument("--stride", type=int, default=1, help="segment every N-th frame (default 1)")
    v.add_argument("--max-frames", type=int, metavar="N", help="segment at most N frames per clip")
    v.add_argument("--fps", type=float, default=10.0, help="frame rate of --clips folders (default 10)")
    v.add_argument("--key-every", type=int, default=10, metavar="K", help="vocabulary on every K-th frame (default 10)")
    v.add_argument(
        "--smoothing",
        type=float,
        default=DEFAULT_SMOOTHING,
        help=f"weight of the past in the moving average of logits (0 = off; default {DEFAULT_SMOOTHING})",
    )
    v.add_argument(
        "--motion-threshold",
        type=float,
        default=DEFAULT_MOTION,
        metavar="T",
        help="a pixel whose colour changed by more than T (0-255) since the previous frame is not averaged "
        f"(inf: every pixel is; default {DEFAULT_MOTION:g})",
    )
    v.add_argument(
        "--chunk",
        type=int,
        default=16,
        metavar="N",
        help="SAM 3 video model: frames tracked per chunk (memory stays flat; a killed clip restarts at its chunk)",
    )
    v.add_argument(
        "--no-track",
        action="store_true",
        help="SAM 3: segment clips frame by frame (smoothed) even when the source holds the video model",
    )
    g = p.add_argument_group("export (python -m autoseg.export has every option)")
    g.add_argument("--export", choices=list(FORMATS), metavar="FORMAT", help=f"then export as {', '.join(FORMATS)}")
    g.add_argument("--export-out", type=Path, metavar="DEST", help="export folder (default: DIR_FORMAT beside DIR)")
    return add_device_args(add_pipeline_args(p))


def export_dest(args: argparse.Namespace) -> Path | None:
    """Where ``--export`` writes: ``--export-out``, or ``DIR_FORMAT`` beside the output folder."""
    if args.export is None:
        return None
    return args.export_out or args.output.with_name(f"{args.output.name}_{args.export}")


def clip_options_from_args(args: argparse.Namespace):
    """The clip settings of the video flags (checked: ValueError names a bad one)."""
    from autoseg.video.run import ClipOptions
    from autoseg.video.vocabulary import VocabularyOptions

    if args.devices * args.num_nodes > 1:
        raise ValueError("videos and --clips run in one process: leave out --devices / --num-nodes")
    if args.export is not None:
        raise ValueError("--export works on images; clip outputs are not exported yet")
    if args.key_every < 1 or args.fps <= 0:
        raise ValueError(f"--key-every ({args.key_every}) and --fps ({args.fps}) must be positive")
    return ClipOptions(
        stride=args.stride,
        max_frames=args.max_frames,
        smoothing=args.smoothing,
        motion=args.motion_threshold,
        vocabulary=VocabularyOptions(every=args.key_every),
        track=not args.no_track,
        chunk=args.chunk,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run inference; returns 0 when every input succeeded, 1 when some failed, 2 on usage/setup errors.

    Everything that can be checked without the models (inputs, config, output folder, its lock) is checked before
    they load.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from autoseg.api import build_pipeline
    from autoseg.config import to_dict
    from autoseg.models.loading import ModelLoadError
    from autoseg.outputs import OutputWriteError, RunManifest
    from autoseg.run import launch_rank, segment_inputs, segment_into, unique_clip_names, unique_stems
    from autoseg.utils.io import check_apart, prepare_output_dir
    from autoseg.utils.video import split_inputs

    with contextlib.ExitStack() as stack:
        try:
            check_run_args(args)
            found, clips = split_inputs(args.paths, args.clips, args.fps)
            if not found and not clips:
                raise ValueError(f"no files found in {' '.join(args.paths)}")
            clip_options = clip_options_from_args(args) if clips else None
            check_apart(args.output, args.paths, "input", "output folder")
            if args.export is not None:  # refused now rather than after the run
                check_destination(args.output, export_dest(args), force=False, inputs=args.paths)
            config = config_from_args(args)
            out_dir = prepare_output_dir(args.output)
            rank = launch_rank(args.devices, args.num_nodes)
            run = stack.enter_context(RunManifest(out_dir, {"config": to_dict(config)}, rank=rank))
            files = [(file, stem) for (file, _), stem in zip(found, unique_stems(found), strict=True)]
            names = unique_clip_names([stem for _, stem in files], [(c.path, c.name) for c in clips])
            for clip, name in zip(clips, names, strict=True):
                clip.name = name  # a.png and a.mp4 in one folder: the clip writes a_mp4.json
            if clips:
                pipeline = build_pipeline(config, checked=True)
                entries = segment_inputs(pipeline, files, clips, run, clip_options, args.skip_existing, args.max_pixels)
            else:
                entries = segment_into(
                    config, files, run, args.devices, args.num_nodes, args.skip_existing, args.max_pixels
                )
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
    if args.export is not None:
        try:
            print(export_predictions(args.output, args.export, export_dest(args))["text"])
        except (OSError, ValueError) as e:
            print(f"infer.py: export error: {e}", file=sys.stderr)
            return EXIT_SOME_FAILED
    return EXIT_SOME_FAILED if failed else EXIT_OK
