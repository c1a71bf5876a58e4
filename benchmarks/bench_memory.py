"""Peak memory of ``infer.py --preset demo`` on 50 vs 500 ShapesWorld images: it must not grow with the run.

    python benchmarks/bench_memory.py [--small 50] [--large 500] [--json out.json]

Each run is a fresh ``infer.py`` process; its peak resident set size comes from the kernel (``wait4``'s
``ru_maxrss``). Reported: both peaks in MB and their ratio (goal: within 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, size: int = 128, seed: int = 11) -> None:
    from autoseg.data.shapes import ShapesConfig, generate_sample

    folder.mkdir(parents=True)
    config = ShapesConfig(size=size)
    for i in range(n):
        image, _, _ = generate_sample(seed, i, config)
        image.save(folder / f"{i:05d}.png")


def peak_rss_mb(inputs: Path, out: Path, batch_size: int) -> float:
    """Run ``infer.py`` on ``inputs``; its peak RSS in MB (the process must succeed)."""
    cmd = [sys.executable, str(ROOT / "infer.py"), str(inputs), "-o", str(out), "--preset", "demo"]
    cmd += ["--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"infer.py failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=50)
    p.add_argument("--large", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "large", args.large)
        (tmp / "small").mkdir()
        for f in sorted((tmp / "large").iterdir())[: args.small]:
            (tmp / "small" / f.name).symlink_to(f)
        small = peak_rss_mb(tmp / "small", tmp / "out_small", args.batch_size)
        large = peak_rss_mb(tmp / "large", tmp / "out_large", args.batch_size)
    result = {
        "images": [args.small, args.large],
        "peak_rss_mb": [round(small, 1), round(large, 1)],
        "ratio": large / small,
        "within_10_percent": large <= 1.1 * small,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
