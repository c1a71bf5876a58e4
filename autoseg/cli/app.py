"""``python -m autoseg.app`` (the command line of :mod:`autoseg.app`): start the demo page on a local web server and
print its URL.

With no ``--config``/``--preset`` it serves the shipped offline demo pipeline (``--preset demo``), so it works on a
fresh install with no network. The model flags are those of ``infer.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from autoseg.cli.common import EXIT_OK, EXIT_USAGE, add_pipeline_args, config_from_args

DEFAULT_PRESET = "demo"
MAX_QUEUE = 64  # requests waiting for the models; more are refused with a "queue full" message


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autoseg.app",
        description="Interactive demo page: upload an image (or pick a sample), see the names AutoSeg finds, their "
        "masks and the clusters they came from; edit the names and re-segment; or upload a short clip and see its "
        f"overlay video. Default: --preset {DEFAULT_PRESET} (offline demo models).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the local network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument(
        "--samples",
        type=Path,
        metavar="DIR",
        help="folder of sample images offered on the page (default: the ShapesWorld samples)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        metavar="MB",
        help="largest upload in MB (default: an uncompressed 8-bit RGBA image of --max-pixels, plus 1 MB)",
    )
    from autoseg.app.clips import DEFAULT_CLIP_FRAMES

    p.add_argument(
        "--clip-frames",
        type=int,
        default=DEFAULT_CLIP_FRAMES,
        metavar="N",
        help=f"an uploaded clip's first N frames are segmented (default {DEFAULT_CLIP_FRAMES})",
    )
    add_pipeline_args(p)
    from autoseg.app.backend import PAGE_MAX_PIXELS

    p.set_defaults(max_pixels=PAGE_MAX_PIXELS)  # a shared server: each session holds one image of up to this
    return p


def upload_limit(max_pixels: int, max_upload_mb: float | None = None) -> int:
    """Largest upload accepted, in bytes: ``--max-upload-mb``, else an uncompressed 8-bit RGBA image of
    ``max_pixels`` plus 1 MB of headers (a photo within the pixel limit is never larger)."""
    if max_upload_mb is not None:
        if not 0 < max_upload_mb < float("inf"):
            raise ValueError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
        return int(max_upload_mb * 2**20)
    return 4 * max_pixels + 2**20


def describe_source(args: argparse.Namespace) -> str:
    """How the pipeline was chosen, as the flags that chose it (shown on the page)."""
    flags = [f"--preset {args.preset}" if args.preset else f"--config {args.config}"]
    keys = ("blip", "segmenter", "segmenter_backend", "enhancer")
    flags += [f"--{key.replace('_', '-')} {getattr(args, key)}" for key in keys if getattr(args, key, None)]
    return f"`{' '.join(flags)}`"


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the page until interrupted; returns 2 on usage/setup errors (reported before the models load)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio checks its own URL; not news
    if args.config is None and args.preset is None:
        args.preset = DEFAULT_PRESET
    from autoseg.api import build_pipeline
    from autoseg.app.backend import DemoBackend, sample_images
    from autoseg.models.loading import ModelLoadError

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported
    try:
        from autoseg.app.page import build_page
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        print("autoseg.app: error: Gradio is not installed; pip install -e '.[app]' installs it", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.max_pixels < 1:
            raise ValueError(f"--max-pixels must be a positive number of pixels, got {args.max_pixels}")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if args.clip_frames < 1:
            raise ValueError(f"--clip-frames must be a positive number of frames, got {args.clip_frames}")
        max_upload = upload_limit(args.max_pixels, args.max_upload_mb)
        config = config_from_args(args)
        samples = sample_images(args.samples)
        pipeline = build_pipeline(config, checked=True)
    except (FileNotFoundError, ValueError, ModelLoadError, OSError) as e:
        print(f"autoseg.app: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    backend = DemoBackend(pipeline, max_pixels=args.max_pixels)
    page = build_page(backend, samples, source=describe_source(args), clip_frames=args.clip_frames)
    page.queue(max_size=MAX_QUEUE)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the server as Ctrl+C does (temporary files removed)
    try:
        try:
            _, url, _ = page.launch(
                server_name=args.host,
                server_port=args.port,
                prevent_thread_lock=True,
                quiet=True,
                max_file_size=max_upload,
                footer_links=["api", "settings"],
                run_history=False,
                enable_monitoring=False,
                ssr_mode=False,
                mcp_server=False,
                pwa=False,
            )
        except OSError as e:
            print(f"autoseg.app: error: {args.host}:{args.port}: {e}; try another --port", file=sys.stderr)
            return EXIT_USAGE
        print(f"AutoSeg demo page: {url}  (Ctrl+C stops it)", flush=True)
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
        backend.close()
    return EXIT_OK


def _interrupt(signum, frame):
    raise KeyboardInterrupt
