"""Scoring and LAVE-mapping throughput of ``eval.py --predictions`` against a per-image flow, in one process.

    python benchmarks/bench_eval.py [--images 400] [--size 384] [--json out.json]

A synthetic folder dataset (PASCAL-VOC-like: 20 classes, ``--size`` px masks with ignore borders) and a folder of
``infer.py`` predictions (each image names 6-14 words drawn from class names, synonyms and non-class nouns, as a
noisy captioner would) are written once. Then, on the same files:

- **ours**: :func:`autoseg.evaluate.evaluate_predictions` with the offline sentence-embedding mapper: every unique
  name of the dataset is mapped once (one batched embedding call), then one confusion matrix is accumulated
  (:class:`autoseg.metrics.DatasetIoU`).
- **reference** (the released code's flow): every unique name of the dataset is sent to the same backend on its own,
  one query per name (as the original LAVE queries its LLM), then each image's confusion matrix is computed with
  numpy's ``bincount``, as detectron2's ``SemSegEvaluator`` does, and summed.

Both give the same mIoU (checked: ``identical``). Reported: images/s of each, the speedup, the reference's seconds
spent mapping and scoring, and the number of unique names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoseg.data.classes import class_names  # noqa: E402
from autoseg.data.datasets import build_dataset  # noqa: E402
from autoseg.evaluate import evaluate_predictions  # noqa: E402
from autoseg.lave import build_mapper  # noqa: E402
from autoseg.metrics import metrics_from_confusion, to_dataset_ids  # noqa: E402
from autoseg.outputs import Prediction, read_prediction, write_prediction  # noqa: E402

OTHER_NOUNS = "sky road grass tree wall floor building water sand field street snow rock table fence window".split()
SYNONYMS = "man woman person people kid plane airplane car auto motorbike bike sofa tv monitor puppy kitten".split()


def make_data(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``root/ds`` (folder dataset) and ``root/preds`` (infer.py outputs named like its images)."""
    rng = np.random.default_rng(seed)
    classes = class_names("voc20")
    pool = list(classes) + SYNONYMS + OTHER_NOUNS
    ds = root / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    (ds / "classes.txt").write_text("\n".join(classes) + "\n")
    for i in range(n):
        name = f"img{i:05d}"
        h, w = size, size * 4 // 3
        mask = np.repeat(rng.integers(0, len(classes), (h // 32 + 1, w // 32 + 1)), 32, 0)
        mask = np.repeat(mask, 32, 1)[:h, :w].astype(np.uint8)
        mask[:3] = 255  # unscored border
        Image.fromarray(mask, mode="L").save(ds / "masks" / f"{name}.png")
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        image.save(ds / "images" / f"{name}.jpg", quality=60)
        vocabulary = list(dict.fromkeys(rng.choice(pool, size=int(rng.integers(6, 15))).tolist()))
        labels = rng.integers(0, len(vocabulary) + 1, (h // 16 + 1, w // 16 + 1))
        labels = np.repeat(np.repeat(labels, 16, 0), 16, 1)[:h, :w]
        write_prediction(root / "preds", name, image, name + ".jpg", Prediction(vocabulary, labels))


def reference_flow(pred_dir: Path, dataset, backend) -> tuple[np.ndarray, float, float]:
    """The released code's flow; returns the confusion matrix and the seconds spent mapping and scoring."""
    c = dataset.num_classes
    t0 = time.perf_counter()
    predictions = [read_prediction(pred_dir, name) for name in dataset.names]
    unique = sorted({w for _, vocabulary in predictions for w in vocabulary})
    mapping = {w: next(iter(backend.map([w], dataset.classes, "folder")))[1] for w in unique}  # one query per name
    t_map = time.perf_counter() - t0
    confmat = np.zeros((c, c + 1), np.int64)
    for i, (label_map, vocabulary) in enumerate(predictions):
        gt = dataset.read_mask(i)
        ids = to_dataset_ids(label_map, vocabulary, mapping, c, dataset.background_index)
        keep = gt != dataset.ignore_index
        flat = (c + 1) * gt[keep].astype(np.int64) + ids[keep]
        confmat += np.bincount(flat, minlength=c * (c + 1)).reshape(c, c + 1)
    return confmat, t_map, time.perf_counter() - t0 - t_map


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=384, help="image height in pixels (width 4/3 of it)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root, args.images, args.size)
        dataset = build_dataset("folder", root / "ds")
        mapper = build_mapper("embedding")
        # load the models (sentence encoder, spaCy's lemmatizer) outside the timing, as for the reference flow
        list(mapper.backend.map(["warm up"], dataset.classes, "folder"))
        mapper._lemma_fn()

        t0 = time.perf_counter()
        report = evaluate_predictions(root / "preds", dataset, mapper, progress=False)
        ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        confmat, t_map, t_score = reference_flow(root / "preds", dataset, mapper.backend)
        naive = time.perf_counter() - t0
        identical = abs(100 * float(metrics_from_confusion(confmat)["mIoU"]) - report["mIoU"]) < 1e-9
    result = {
        "images": args.images,
        "unique_names": len(report["mapping"]),
        "ours_ips": args.images / ours,
        "naive_ips": args.images / naive,
        "speedup": naive / ours,
        "ours_seconds": ours,
        "naive_seconds": {"mapping": t_map, "reading and scoring": t_score},
        "identical": identical,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
