"""How good are auto-labels? The demo preset labels held-out ShapesWorld images; the class-mapped export is scored
against the true masks.

    python benchmarks/bench_autolabel.py [--n 100] [--seed 424242] [--mapper embedding] [--work DIR] [--json out.json]

Steps, each the command a user would run: ``python -m autoseg.data.shapes`` (held-out images with true masks),
``infer.py --preset demo`` on the images alone, ``python -m autoseg.export --to folder --classes classes.txt`` (an
AutoSeg folder dataset: ``images/``, ``masks/``, ``classes.txt``), then the exported masks are scored against the
true ones with AutoSeg's confusion-matrix metric (unlabelled pixels of the export count as misses). Reported: mIoU,
pixel accuracy, the share of pixels the export labels (coverage) and the accuracy on those pixels (precision), per
class IoU; and, as a cross-check, ``eval.py --predictions`` on the same predictions with the same mapper, which must
give the same mIoU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sh(*cmd: str) -> None:
    """Run one command from the repository root (it must succeed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, check=True)


def score(export: Path, truth: Path) -> dict:
    """The exported folder dataset's masks against the true masks (same names, same classes.txt order)."""
    from autoseg.data.datasets import build_dataset
    from autoseg.metrics import DatasetIoU

    pred_ds, true_ds = build_dataset("folder", export), build_dataset("folder", truth)
    if pred_ds.classes != true_ds.classes:
        raise ValueError(f"class lists differ: {pred_ds.classes} vs {true_ds.classes}")
    n = len(true_ds.classes)
    metric = DatasetIoU(n, true_ds.ignore_index)
    exported = {s.name: i for i, s in enumerate(pred_ds.samples)}
    labelled = correct = total = 0
    for i, sample in enumerate(true_ds.samples):
        gt = true_ds.read_mask(i)
        pred = pred_ds.read_mask(exported[sample.name]) if sample.name in exported else np.full_like(gt, 255)
        pred = np.where(pred == 255, n, pred)  # unlabelled: a miss
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt))
        scored = gt != true_ds.ignore_index
        total += int(scored.sum())
        labelled += int((scored & (pred != n)).sum())
        correct += int((scored & (pred == gt)).sum())
    result = {k: v.numpy() for k, v in metric.compute().items()}
    return {
        "images_scored": len(true_ds),
        "images_exported": len(pred_ds),
        "mIoU": round(100 * float(result["mIoU"]), 2),
        "pixel_acc": round(100 * float(result["pixel_acc"]), 2),
        "coverage": round(100 * labelled / total, 2),
        "precision": round(100 * correct / max(labelled, 1), 2),
        "per_class": {  # None: a class absent from both the truth and the labels
            c: None if np.isnan(v) else round(100 * float(v), 1)
            for c, v in zip(true_ds.classes, result["iou"], strict=True)
        },
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="held-out images (default 100)")
    p.add_argument("--seed", type=int, default=424242, help="ShapesWorld seed (default: the recipe's held-out seed)")
    p.add_argument(
        "--mapper", default="embedding", choices=["exact", "embedding"], help="LAVE mapper (default as eval)"
    )
    p.add_argument("--work", type=Path, help="keep the images, predictions and export here (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        truth, preds, export = work / "heldout", work / "predictions", work / "autolabels"
        if not (truth / "classes.txt").is_file():
            sh("-m", "autoseg.data.shapes", "--seed", str(args.seed), "--n", str(args.n), "--out", str(truth))
        sh("infer.py", str(truth / "images"), "-o", str(preds), "--preset", "demo", "--skip-existing")
        sh("-m", "autoseg.export", str(preds), "--to", "folder", "--out", str(export), "--force", "--no-progress",
           "--classes", str(truth / "classes.txt"), "--mapper", args.mapper)  # fmt: skip
        result = {"seed": args.seed, "n": args.n, "mapper": args.mapper, **score(export, truth)}
        report = work / "eval_report.json"
        sh("eval.py", "--dataset", "folder", "--root", str(truth), "--predictions", str(preds), "--mapper",
           args.mapper, "--report", str(report), "--no-progress")  # fmt: skip
        result["eval_py_mIoU"] = round(json.loads(report.read_text())["mIoU"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
