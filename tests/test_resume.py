"""``train.py fit`` resumed from a checkpoint ends with exactly the weights of the uninterrupted run.

One uninterrupted run of 6 steps (2 steps per epoch) keeps a checkpoint after every step and at every epoch end; a run
resumed from any of them with the same config must end bit-identical (``torch.equal`` on every tensor). The enhancer
samples ``max_patches`` patches per step with torch's global generator, so the model side draws random numbers too.
"""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from autoseg.cli.train import cli_main
from autoseg.data.datamodules import EpochSampler, ResumableLoader, SeededItems

CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def fit_args(root, *extra):
    """The debug enhancer config, 8 training images in batches of 4 (2 steps per epoch), 6 steps."""
    return [
        "fit",
        "-c",
        "configs/debug/enhancer.yaml",
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--data.shapesworld.root={root.parent / 'shapes'}",
        "--data.shapesworld.n_train=8",
        "--data.shapesworld.n_val=4",
        "--data.batch_size=4",
        "--trainer.max_steps=6",
        "--model.init_args.max_patches=64",  # a random subset of the 4 x 64 patches each step
        *extra,
    ]


def keep_every(dirpath, filename, **when):
    """CLI arguments that add a ModelCheckpoint keeping every checkpoint it writes."""
    args = [f"--trainer.callbacks+={CHECKPOINT}", f"--trainer.callbacks.dirpath={dirpath}"]
    args += [f"--trainer.callbacks.filename={filename}", "--trainer.callbacks.save_top_k=-1"]
    args += ["--trainer.callbacks.auto_insert_metric_name=false"]
    return args + [f"--trainer.callbacks.{k}={v}" for k, v in when.items()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(checkpoint folder, final state dict) of the uninterrupted run."""
    root = tmp_path_factory.mktemp("resume") / "full"
    ckpts = root / "kept"
    steps = keep_every(ckpts, "step{step}", every_n_train_steps=1)
    # every epoch end; mode only makes its state key differ from the config's `last` checkpoint
    epochs = keep_every(ckpts, "epoch{epoch}", every_n_epochs=1, mode="max")
    cli = cli_main(fit_args(root, *steps, *epochs))
    assert cli.trainer.global_step == 6
    return ckpts, {k: v.clone() for k, v in cli.model.state_dict().items()}


@pytest.mark.parametrize(
    ("checkpoint", "extra"),
    [
        ("epoch1.ckpt", []),  # written at the end of epoch 1 (after validation), as the config's last.ckpt is
        ("step4.ckpt", []),  # written after the last batch of epoch 1, before its validation
        ("step3.ckpt", []),  # mid-epoch: after the first of the 2 batches of epoch 1
        ("step3.ckpt", ["--data.num_workers=2"]),  # the same, loaded by worker processes
    ],
)
def test_resumed_fit_ends_bit_identical_to_the_uninterrupted_run(uninterrupted, tmp_path, checkpoint, extra):
    ckpts, expected = uninterrupted
    cli = cli_main(fit_args(tmp_path, *extra, "--trainer.log_every_n_steps=1", f"--ckpt_path={ckpts / checkpoint}"))
    assert cli.trainer.global_step == 6
    events = EventAccumulator(str(tmp_path / "runs" / "lightning_logs" / "version_0"))
    events.Reload()
    start = int(checkpoint.removeprefix("epoch").removeprefix("step").removesuffix(".ckpt"))
    start = 2 * (start + 1) if checkpoint.startswith("epoch") else start
    assert len(events.Scalars("train/loss")) == 6 - start  # it did resume: only the remaining steps ran
    state = cli.model.state_dict()
    assert state.keys() == expected.keys()
    different = [k for k, v in expected.items() if not torch.equal(state[k], v)]
    assert not different, different


class Draw:
    """A dataset item that records a torch random draw made while loading it (an augmentation's)."""

    def __getitem__(self, index):
        return {"i": index, "draw": torch.rand(()).item()}

    def __len__(self):
        return 10


def test_order_and_augmentation_depend_only_on_seed_epoch_and_item():
    def epoch(seed, e, replicas=1, rank=0):
        sampler = EpochSampler(Draw(), replicas, rank, seed=seed)
        sampler.set_epoch(e)
        torch.manual_seed(e * 1000 + rank)  # the global generator's state must not matter
        return [SeededItems(Draw())[key] for key in sampler]

    first = epoch(0, 0)
    assert first == epoch(0, 0) and sorted(x["i"] for x in first) == list(range(10))
    assert [x["i"] for x in epoch(0, 1)] != [x["i"] for x in first]
    assert [x["i"] for x in epoch(1, 0)] != [x["i"] for x in first]
    draws = {x["i"]: x["draw"] for x in first}
    assert len(set(draws.values())) == 10  # each item its own draw...
    assert {x["i"]: x["draw"] for x in epoch(0, 1)} != draws  # ...new each epoch
    halves = epoch(0, 0, 2, 0) + epoch(0, 0, 2, 1)  # two processes split the epoch without overlap
    assert sorted(x["i"] for x in halves) == list(range(10))


def test_loader_state_resumes_the_epoch_after_the_batches_already_seen():
    def loader():
        return ResumableLoader(SeededItems(Draw()), batch_size=3, sampler=EpochSampler(Draw(), seed=7), drop_last=True)

    full = loader()
    full.sampler.set_epoch(2)
    batches = []
    for batch in full:
        batches.append(batch)
        if len(batches) == 1:
            state = full.state_dict()
    assert state == {"epoch": 2, "batches": 1} and full.state_dict() == {"epoch": 2, "batches": 3}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert len(rest) == 2
    for a, b in zip(batches[1:], rest, strict=True):
        assert torch.equal(a["i"], b["i"]) and torch.equal(a["draw"], b["draw"])
    assert len(list(resumed)) == 3  # the skip applies once; another epoch (or a finished one) starts at its beginning
