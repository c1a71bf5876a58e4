"""Training augmentation and collation of the ShapesWorld recipe's batches: ours vs torchvision's v2 pipeline.

    python benchmarks/bench_augment.py [--n 512] [--batch 64] [--size 128] [--repeats 5] [--json out.json]

Both sides get the same decoded items (PIL image, uint8 mask: what ``data.cache_decoded`` keeps) and the same seed
per item. The baseline is what a torchvision user writes: ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip,
ToDtype])`` on ``tv_tensors.Image`` / ``tv_tensors.Mask`` (the mask kept uint8, which torchvision resizes without a
cast, and made ``int64``, the class ids a loss indexes with, at the end), then ``default_collate``. Ours is ``SegmentationTransform(train=True)`` + ``collate``. Every batch must be
byte-equal; reported: milliseconds per item, best of ``--repeats`` alternating passes, and the ratio. The recipe's
stages load each batch on the training thread (``num_workers: 0`` keeps both cores for the two lanes), so this is
time every step waits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_items(n: int, size: int, seed: int = 3) -> list[dict]:
    from autoseg.data.shapes import ShapesConfig, generate_sample

    config = ShapesConfig(size=size)
    items = []
    for i in range(n):
        image, mask, _ = generate_sample(seed, i, config)
        items.append({"image": image, "mask": np.asarray(mask, np.uint8), "name": f"{i:05d}"})
    return items


def baseline(size: int, scale: tuple[float, float]):
    from torch.utils.data import default_collate
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    compose = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        ]
    )

    def item(it: dict) -> dict:
        image = tv_tensors.Image(v2.functional.pil_to_tensor(it["image"]))
        mask = tv_tensors.Mask(torch.as_tensor(it["mask"]))
        out = compose({"image": image, "mask": mask})
        return {"image": out["image"].as_subclass(torch.Tensor), "mask": out["mask"].as_subclass(torch.Tensor).long()}

    return item, default_collate


def ours(size: int, scale: tuple[float, float]):
    from autoseg.data.transforms import SegmentationTransform, collate

    transform = SegmentationTransform(size, train=True, scale=scale)

    def item(it: dict) -> dict:
        out = transform(it)
        return {"image": out["image"], "mask": out["mask"]}

    return item, collate


def batches(items: list[dict], pipeline, batch: int) -> list[dict]:
    """Every batch of ``items``, each item under its own seed (as the recipe's loader seeds it)."""
    item, collate = pipeline
    out = []
    for start in range(0, len(items) - batch + 1, batch):
        loaded = []
        for k in range(start, start + batch):
            torch.default_generator.manual_seed(1000 + k)  # as the training loader seeds each item
            loaded.append(item(items[k]))
        out.append(collate(loaded))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=512, help="items per pass")
    p.add_argument("--batch", type=int, default=64, help="batch size (the recipe's first stages: 64)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread per recipe lane
    items = make_items(args.n, args.size)
    scale = (0.35, 1.0)  # SegmentationTransform's default crop scale, as the segmenter stages use
    pipelines = {"torchvision_v2": baseline(args.size, scale), "autoseg": ours(args.size, scale)}
    reference, mine = (batches(items, pipe, args.batch) for pipe in pipelines.values())
    for a, b in zip(reference, mine, strict=True):
        for key in ("image", "mask"):
            if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key]):
                raise AssertionError(f"the two pipelines' {key} batches differ: the benchmark compares like with like")
    best = dict.fromkeys(pipelines, float("inf"))
    for _ in range(args.repeats):
        for name, pipe in pipelines.items():
            start = time.perf_counter()
            batches(items, pipe, args.batch)
            best[name] = min(best[name], time.perf_counter() - start)
    n = len(reference) * args.batch
    result = {
        "items": n,
        "batch": args.batch,
        "size": args.size,
        "byte_equal_batches": True,
        "ms_per_item": {name: round(1000 * t / n, 3) for name, t in best.items()},
        "speedup": round(best["torchvision_v2"] / best["autoseg"], 2),
    }
    report = json.dumps(result, indent=2)
    print(report)
    if args.json:
        args.json.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
