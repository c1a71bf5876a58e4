"""Run :class:`autoseg.metrics.DatasetIoU` under DDP on CPU (gloo, 2 processes) and save each rank's result.

Usage: ``python tests/ddp_metric_script.py OUT_DIR DATA.npz`` where ``DATA.npz`` holds ``preds`` and ``targets``
(``N x H x W``), ``num_classes``, ``ignore_index`` and ``absent_rule``. Rank r updates with images r, r + 2, ...;
each rank writes ``OUT_DIR/rank{r}.json`` with its synced ``compute()`` and its local (unsynced) confusion matrix.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autoseg.metrics import DatasetIoU

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str, data_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        data = np.load(data_path)
        metric = DatasetIoU(int(data["num_classes"]), int(data["ignore_index"]), str(data["absent_rule"]))
        for i in range(rank, len(data["preds"]), WORLD_SIZE):
            metric.update(torch.from_numpy(data["preds"][i]), torch.from_numpy(data["targets"][i]))
        local = metric.confmat.clone()
        result = metric.compute()  # syncs the confusion matrices across ranks
        record = {k: v.tolist() for k, v in result.items()}
        record["local_confmat"] = local.tolist()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    out_dir, data_path = argv
    mp.spawn(_worker, args=(_free_port(), out_dir, data_path), nprocs=WORLD_SIZE, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
