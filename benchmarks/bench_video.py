"""Clip segmentation against the same frames segmented as separate images, on held-out ShapesWorld clips.

    python benchmarks/bench_video.py [--clips 8] [--frames 30] [--seed 424242] [--preset demo] [--smoothing A ...]
        [--memory] [--json out.json]

Writes ``--clips`` ShapesWorld video clips (``python -m autoseg.data.shapes --video``), then segments their PNG frames
(the same pixels for every flow) three ways with ``infer.py``:

- **clip**: ``--clips`` (one vocabulary per clip from key frames, logits of still pixels averaged over time, default
  settings);
- **clip, every pixel averaged (0.7)**: the plain moving average the first clip flow used (``--smoothing 0.7
  --motion-threshold inf``);
- **clip, no smoothing**: the same with ``--smoothing 0`` (what the clip vocabulary alone gives);
- **per frame**: the frames folder as separate images (a vocabulary per frame: what AutoSeg did before);
- **clip, smoothing A**: for each ``--smoothing A`` given, the clip flow with that weight (for choosing the default on
  a development seed; 424242 is the held-out seed of every ShapesWorld figure, 777 the development one).

Each is scored by ``eval.py --dataset video-folder --mapper exact`` (the demo's names are the class names): mIoU over
all frames and flicker. The clip flow's figures are also recomputed independently (numpy ``bincount`` over the files,
names looked up by hand) and must agree. ``--memory`` also measures the peak resident memory of ``infer.py`` on one
clip of 30 and one of 300 frames (each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoseg.cli.eval import main as eval_main  # noqa: E402
from autoseg.cli.infer import main as infer_main  # noqa: E402
from autoseg.data.shapes_scene import ShapesConfig  # noqa: E402
from autoseg.data.shapes_video import write_video_dataset  # noqa: E402

FLOWS = {
    "clip": ["--clips"],
    "clip, every pixel averaged (0.7)": ["--clips", "--smoothing", "0.7", "--motion-threshold", "inf"],
    "clip, no smoothing": ["--clips", "--smoothing", "0"],
    "per frame": [],
}


def independent_figures(ds: Path, pred: Path) -> tuple[float, float]:
    """mIoU (mmseg rule) and flicker of clip predictions, from the files alone (exact names)."""
    classes = (ds / "classes.txt").read_text().split()
    n = len(classes)
    confusion = np.zeros((n + 1, n + 1), np.int64)
    changed = stable = 0
    for clip in sorted(p.name for p in (ds / "masks").iterdir()):
        names = json.loads((pred / f"{clip}.json").read_text())["vocabulary"]
        lut = np.array([n] + [classes.index(w) if w in classes else n for w in names])
        previous = None
        for mask_file in sorted((ds / "masks" / clip).glob("*.png")):
            gt = np.asarray(Image.open(mask_file)).astype(np.int64)
            ids = lut[np.asarray(Image.open(pred / clip / mask_file.name)).astype(np.int64)]
            keep = gt != 255
            confusion += np.bincount(gt[keep] * (n + 1) + ids[keep], minlength=(n + 1) ** 2).reshape(n + 1, n + 1)
            if previous is not None:
                same = (gt == previous[0]) & keep
                stable += int(same.sum())
                changed += int((same & (ids != previous[1])).sum())
            previous = (gt, ids)
    tp = np.diag(confusion)[:n]
    union = confusion[:n].sum(1) + confusion[:, :n].sum(0) - tp
    return 100 * float(np.mean(tp[union > 0] / union[union > 0])), 100 * changed / stable


def peak_memory_mb(video: Path, out: Path, preset: str) -> float:
    """Peak resident memory (MB) of ``infer.py`` on one video, in a fresh process."""
    code = (
        "import resource, sys; from autoseg.cli.infer import main; "
        f"main([{str(video)!r}, '-o', {str(out)!r}, '--preset', {preset!r}]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--seed", type=int, default=424242)
    p.add_argument("--preset", default="demo")
    p.add_argument("--smoothing", type=float, nargs="*", default=[], help="also the clip flow with these weights")
    p.add_argument("--memory", action="store_true", help="also peak memory of a 30- and a 300-frame clip")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    flows = {**FLOWS, **{f"clip, smoothing {a:g}": ["--clips", "--smoothing", str(a)] for a in args.smoothing}}
    results: dict = {"clips": args.clips, "frames": args.frames, "seed": args.seed, "preset": args.preset}
    with tempfile.TemporaryDirectory() as tmp:
        ds = write_video_dataset(Path(tmp) / "ds", args.clips, args.seed, args.frames, ShapesConfig(), progress=False)
        for flow, flags in flows.items():
            out = Path(tmp) / flow.replace(" ", "_").replace(",", "")
            start = time.perf_counter()
            assert infer_main([str(ds / "frames"), "-o", str(out), "--preset", args.preset, *flags]) == 0
            seconds = time.perf_counter() - start
            report = Path(tmp) / f"report_{out.name}" / "report.json"
            argv = ["--dataset", "video-folder", "--root", str(ds), "--predictions", str(out), "--mapper", "exact"]
            assert eval_main([*argv, "--report", str(report), "--no-progress"]) == 0
            scored = json.loads(report.read_text())
            results[flow] = {"mIoU": scored["mIoU"], "flicker": scored["flicker"], "seconds": seconds}
            if flow == "clip":
                miou, flicker = independent_figures(ds, out)
                results[flow]["independent"] = {"mIoU": miou, "flicker": flicker}
                assert abs(miou - scored["mIoU"]) < 1e-6 and abs(flicker - scored["flicker"]) < 1e-6
        if args.memory:
            for frames in (30, 300):
                mem = write_video_dataset(Path(tmp) / f"mem{frames}", 1, args.seed, frames, progress=False)
                video = mem / "videos" / "clip_000000.mp4"
                results[f"peak_memory_mb_{frames}_frames"] = peak_memory_mb(
                    video, Path(tmp) / f"memout{frames}", args.preset
                )
    print(f"{args.clips} ShapesWorld clips x {args.frames} frames (seed {args.seed}), preset {args.preset}\n")
    print("| flow | mIoU | flicker | seconds |\n|---|---:|---:|---:|")
    for flow in flows:
        r = results[flow]
        print(f"| {flow} | {r['mIoU']:.2f} | {r['flicker']:.2f} | {r['seconds']:.1f} |")
    if args.memory:
        print(
            f"\npeak memory: {results['peak_memory_mb_30_frames']:.0f} MB (30 frames), "
            f"{results['peak_memory_mb_300_frames']:.0f} MB (300 frames)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
