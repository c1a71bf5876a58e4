"""Memory of SAM 3 video on a clip: our chunked tracker against transformers' pre-loaded-video flow, at two lengths.

    python benchmarks/bench_sam3_video.py [--short 30] [--long 300] [--json out.json]

A tiny random SAM 3 video model (built from configs, saved and loaded by path like ``facebook/sam3``; its tracker reads
the last 16 frames, as SAM 3's does) tracks two names through one ShapesWorld clip of ``--long`` frames (the short run
reads its first ``--short`` frames). Flows, each in a fresh process:

- ``chunked``: :class:`autoseg.models.segmenters.sam3_video.Sam3ClipTracker` (``--chunk`` frames at a time, state on
  CPU, the session pruned after every frame), frames streamed from the folder;
- ``preloaded``: the way transformers' docs show: ``init_video_session(video=frames)`` then
  ``propagate_in_video_iterator``, each frame post-processed, turned into a label map and dropped.

Reported per flow and length: peak resident memory (``ru_maxrss``) and its growth over the process's memory after
loading the model, the session's tensor bytes at the end (``state_bytes``), frames the session holds, seconds; and the
long / short ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAMES = ["circle", "square"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(flow: str, model_dir: str, frames_dir: str, n: int, chunk: int) -> dict:
    """One flow on the first ``n`` frames, in this process; its figures."""
    import torch

    from autoseg.models.segmenters.sam3_video import BoundedSession, Sam3ClipTracker, load_video_model, paint_objects
    from autoseg.utils.video import ClipSource

    torch.set_num_threads(1)
    model, processor = load_video_model(model_dir)
    source = ClipSource(frames_dir, "clip")
    base = rss_mb()
    start = time.perf_counter()
    if flow == "chunked":
        tracker = Sam3ClipTracker(model, processor, chunk=chunk)
        count = sum(1 for _ in tracker.track(source.frames(max_frames=n), NAMES))
        state, held = tracker.peak_state_bytes, tracker.peak_frames_held
    else:
        video = [image for _, image in source.frames(max_frames=n)]
        session = processor.init_video_session(video=video, inference_device="cpu")
        processor.add_text_prompt(session, NAMES)
        count = 0
        for out in model.propagate_in_video_iterator(inference_session=session):
            paint_objects(processor.postprocess_outputs(session, out), session.obj_id_to_prompt_id)
            count += 1
        state, held = BoundedSession.state_bytes(session), BoundedSession.frames_held(session)
    assert count == n, (count, n)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "frames": n,
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - base, 1),
        "state_mb": round(state / 2**20, 2),
        "frames_held": held,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(flow: str, model_dir: Path, frames_dir: Path, n: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", flow, str(model_dir), str(frames_dir), str(n), str(chunk)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{flow} on {n} frames failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        flow, model_dir, frames_dir, n, chunk = sys.argv[2:7]
        print(json.dumps(worker(flow, model_dir, frames_dir, int(n), int(chunk))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", type=int, default=30)
    p.add_argument("--long", type=int, default=300)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="frame side and the model's input side (default 128)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    import torch

    from autoseg.data.shapes_scene import ShapesConfig
    from autoseg.data.shapes_video import write_video_dataset
    from autoseg.models import scratch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model_dir = scratch.save(*scratch.make_sam3_video(image_size=args.size, memory=16, words=NAMES), tmp / "m")
        clips = write_video_dataset(tmp / "clips", 1, 3, args.long, ShapesConfig(size=args.size), progress=False)
        frames_dir = clips / "frames" / "clip_000000"
        result: dict = {"chunk": args.chunk, "size": args.size}
        for flow in ("chunked", "preloaded"):
            short, long = (run(flow, model_dir, frames_dir, n, args.chunk) for n in (args.short, args.long))
            result[flow] = {
                "short": short,
                "long": long,
                "peak_ratio": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
                "growth_ratio": round(long["growth_mb"] / max(short["growth_mb"], 0.1), 2),
                "state_ratio": round(long["state_mb"] / short["state_mb"], 2),
            }
            print(flow, json.dumps(result[flow]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
