"""Peak memory of ``python -m autoseg.export`` on 1,000 vs 10,000 prediction sets: it must not grow with the images.

    python benchmarks/bench_export.py [--small 1000] [--large 10000] [--formats coco,labelstudio] [--json out.json]

A prediction folder of ``--large`` synthetic sets (64 x 64 label maps of blocky regions, 2-5 names each from a pool of
300, written by :func:`autoseg.outputs.write_prediction` with a run manifest, as ``infer.py`` writes them) is made
once; the small folder holds the first ``--small`` of them (links and the matching manifest lines). Each export is a
fresh process; its peak resident set size comes from the kernel (``wait4``'s ``ru_maxrss``). Reported per format: both
peaks in MB, their ratio (goal: within 10%) and the seconds each export took.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_predictions(out: Path, images: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """``n`` prediction sets in ``out`` (with manifest.jsonl) for images written to ``images``."""
    from autoseg.outputs import Prediction, RunManifest, write_prediction

    rng = np.random.default_rng(seed)
    pool = [f"name{i:03d}" for i in range(300)]
    images.mkdir(parents=True)
    with RunManifest(out) as run:
        entries = [{"input": str(images / f"{i:06d}.png"), "output": f"{i:06d}", "status": "pending"} for i in range(n)]
        run.start(entries)
        for entry in entries:
            vocabulary = list(rng.choice(pool, size=int(rng.integers(2, 6)), replace=False))
            coarse = rng.integers(0, len(vocabulary) + 1, size=(size // 8, size // 8))
            label_map = np.kron(coarse, np.ones((8, 8), dtype=np.int64))
            image = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
            image.save(entry["input"])
            write_prediction(out, entry["output"], image, entry["input"], Prediction(vocabulary, label_map))
            entry.update(status="ok", vocabulary=vocabulary)
            run.record(entry)
        run.finish()


def subset(large: Path, small: Path, n: int) -> None:
    """The first ``n`` sets of ``large`` as links, with their manifest lines."""
    small.mkdir()
    lines = (large / "manifest.jsonl").read_text().splitlines()[:n]
    (small / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        stem = json.loads(line)["output"]
        for suffix in (".png", ".json", "_overlay.jpg"):
            (small / f"{stem}{suffix}").symlink_to(large / f"{stem}{suffix}")


def export_peak(preds: Path, fmt: str, dest: Path) -> tuple[float, float]:
    """Run the export; its peak RSS in MB and its wall-clock seconds (the process must succeed).

    ``folder`` (at most 254 classes) maps the names onto the first 100 of the pool (``classes.txt`` beside ``preds``)
    with the exact mapper, as a class-mapped export would; the other formats keep every name.
    """
    cmd = [sys.executable, "-m", "autoseg.export", str(preds), "--to", fmt, "--out", str(dest), "--no-progress"]
    if fmt == "folder":
        classes = preds.parent / "classes.txt"
        classes.write_text("".join(f"name{i:03d}\n" for i in range(100)))
        cmd += ["--classes", str(classes), "--mapper", "exact"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"export failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds  # kilobytes on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=1000)
    p.add_argument("--large", type=int, default=10000)
    p.add_argument("--formats", default="coco,coco-panoptic,labelstudio,cvat,folder", help="comma-separated")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    results = {"images": [args.small, args.large], "formats": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_predictions(tmp / "large", tmp / "images", args.large)
        results["seconds_to_make_predictions"] = round(time.perf_counter() - t0, 1)
        subset(tmp / "large", tmp / "small", args.small)
        for fmt in args.formats.split(","):
            small, t_small = export_peak(tmp / "small", fmt, tmp / f"out_small_{fmt}")
            large, t_large = export_peak(tmp / "large", fmt, tmp / f"out_large_{fmt}")
            results["formats"][fmt] = {
                "peak_rss_mb": [round(small, 1), round(large, 1)],
                "ratio": round(large / small, 3),
                "within_10_percent": large <= 1.1 * small,
                "seconds": [round(t_small, 1), round(t_large, 1)],
            }
            print(fmt, json.dumps(results["formats"][fmt]), flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
