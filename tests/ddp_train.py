"""Launch script for the DDP test: ``python tests/ddp_train.py OUT_DIR [extra train.py args]``.

Runs ``train.py fit`` on the debug enhancer config with 2 CPU processes (gloo). Lightning's DDP launcher re-executes
this script (``sys.argv``) once per extra rank, so it must be a script, not a pytest function. Each rank writes
``OUT_DIR/rank{N}.json`` with the world size and its final metrics.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, also in the re-executed ranks

from autoseg.cli.train import cli_main  # noqa: E402
from autoseg.utils.io import atomic_write_json  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    cli = cli_main(
        [
            "fit",
            "-c",
            "configs/debug/enhancer.yaml",
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy=ddp",
            "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={out / 'runs'}",
            f"--data.shapesworld.root={out / 'shapes'}",
            "--data.shapesworld.n_train=16",
            "--data.shapesworld.n_val=4",
            "--data.batch_size=4",
            *sys.argv[2:],
        ]
    )
    trainer = cli.trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step}
    atomic_write_json(out / f"rank{trainer.global_rank}.json", record | {"metrics": metrics})
    print(json.dumps(record | {"metrics": metrics}))


if __name__ == "__main__":
    main()
