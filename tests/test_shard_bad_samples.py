"""Corrupt samples in WebDataset shards: skipped with a warning naming shard and key, fatal past a set fraction."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from autoseg.cli.train import cli_main
from autoseg.data import shards
from autoseg.data.datamodules import DataSource, SegmentationDataModule
from autoseg.data.shapes import ShapesConfig, write_dataset
from autoseg.data.shards import shard_dataset, write_shards

NAMES = [f"{i:06d}" for i in range(7)]  # 3 shards: 000000-000002, 000003-000005, 000006


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), n=7, seed=2, config=ShapesConfig(size=32), progress=False)


@pytest.fixture
def shard_dir(shapes_folder, tmp_path):
    write_shards(shapes_folder, tmp_path / "sh", maxcount=3, progress=False)
    return tmp_path / "sh"


def rewrite(path, replace=None, drop=(), truncate_in=None):
    """Rewrite the tar ``path`` with ``replace`` = {member: bytes}, members in ``drop`` left out, or cut off in
    the middle of member ``truncate_in``'s data."""
    replace = replace or {}
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, data in members:
            if member.name in drop:
                continue
            data = replace.get(member.name, data)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
            if member.name == truncate_in:
                cut = buf.tell() - 512 * ((len(data) + 511) // 512) + len(data) // 2
                path.write_bytes(buf.getvalue()[:cut])
                return
    path.write_bytes(buf.getvalue())


def png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def loader_names(shard_dir, **kwargs):
    dm = SegmentationDataModule(
        train=DataSource("shards", str(shard_dir)), image_size=16, batch_size=2, num_workers=0, **kwargs
    )
    dm.setup("fit")
    return sorted(n for batch in dm.train_dataloader() for n in batch["name"])


def bad_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "bad shard sample" in r.message]


def test_corrupt_image_is_skipped_with_a_warning_naming_shard_and_key(shard_dir, caplog):
    rewrite(shard_dir / "shard-000001.tar", {"000004.image.png": b"these bytes are not an image"})
    with caplog.at_level(logging.WARNING):
        names = loader_names(shard_dir)
    assert names == [n for n in NAMES if n != "000004"]
    (message,) = bad_warnings(caplog)
    assert "shard-000001.tar" in message and "'000004'" in message and "image.png" in message, message


@pytest.mark.parametrize(
    "damage, lost",
    [
        ({"replace": {"000003.mask.png": png(np.zeros((5, 7), np.uint8))}}, ["000003"]),  # mask of another size
        ({"drop": ["000003.mask.png"]}, ["000003"]),  # no mask member
        ({"truncate_in": "000005.mask.png"}, ["000005"]),  # tar cut off inside a member: the shard's rest is lost
    ],
    ids=["mask-size", "missing-mask", "truncated-member"],
)
def test_bad_masks_and_truncated_members_are_skipped(shard_dir, caplog, damage, lost):
    rewrite(shard_dir / "shard-000001.tar", **damage)
    with caplog.at_level(logging.WARNING):
        names = loader_names(shard_dir)
    assert names == [n for n in NAMES if n not in lost]
    messages = bad_warnings(caplog)
    assert messages and all("shard-000001.tar" in m for m in messages), messages
    assert any(f"'{lost[0]}'" in m for m in messages), messages


def test_mostly_corrupt_shards_abort_with_a_one_line_error(shard_dir, caplog):
    for shard, keys in (("shard-000000.tar", ["000001", "000002"]), ("shard-000001.tar", ["000003", "000004"])):
        rewrite(shard_dir / shard, {f"{k}.image.png": b"junk" for k in keys})
    dataset = shard_dataset(shard_dir, max_bad_fraction=0.25, min_samples=4)
    with caplog.at_level(logging.WARNING), pytest.raises(shards.TooManyBadSamples) as info:
        list(dataset)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("3 of 4 shard samples were bad (75.0% > max_bad_fraction 0.25)"), message
    assert "sample '000003' of " in message and "shard-000001.tar" in message, message
    assert len(bad_warnings(caplog)) == 3


def test_one_early_bad_sample_does_not_abort_before_the_minimum(shard_dir):
    rewrite(shard_dir / "shard-000000.tar", {"000000.image.png": b"junk"})
    names = [s["name"] for s in shard_dataset(shard_dir, max_bad_fraction=0.01, min_samples=8)]
    assert names == NAMES[1:]
    with pytest.raises(
        shards.TooManyBadSamples, match=r"^1 of 7 shard samples were bad \(14\.3% > max_bad_fraction 0\.01\)"
    ):
        list(shard_dataset(shard_dir, max_bad_fraction=0.01, min_samples=7))


def test_a_pass_without_good_samples_and_a_missing_shard_still_fail(shard_dir):
    rewrite(shard_dir / "shard-000000.tar", {f"{k}.image.png": b"junk" for k in NAMES[:3]})
    with pytest.raises(shards.TooManyBadSamples, match=r"^all 3 shard samples read in this pass were bad; last: "):
        list(shard_dataset(shard_dir / "shard-000000.tar"))  # far below min_samples, but nothing to train on
    with pytest.raises(FileNotFoundError):  # a configuration error, not a bad sample
        list(shard_dataset([str(shard_dir / "shard-000001.tar"), str(shard_dir / "shard-000009.tar")]))


def test_data_module_setting_reaches_the_reader_and_is_checked(shard_dir):
    rewrite(shard_dir / "shard-000002.tar", {"000006.image.png": b"junk"})
    with pytest.raises(
        shards.TooManyBadSamples, match=r"^1 of \d shard samples were bad .* sample '000006' of .*shard-0000"
    ):
        loader_names(shard_dir, max_bad_fraction=0.0)  # 0: the first bad sample is fatal
    assert loader_names(shard_dir, max_bad_fraction=1.0) == NAMES[:6]
    with pytest.raises(ValueError, match="max_bad_fraction=1.5"):
        SegmentationDataModule(train=DataSource("shards", str(shard_dir)), max_bad_fraction=1.5)


def test_worker_processes_skip_bad_samples_too(shard_dir):
    rewrite(shard_dir / "shard-000000.tar", {"000001.image.png": b"junk"})
    dm = SegmentationDataModule(
        train=DataSource("shards", str(shard_dir)), image_size=16, batch_size=2, num_workers=2, shuffle_buffer=0
    )
    dm.setup("fit")
    assert sorted(n for batch in dm.train_dataloader() for n in batch["name"]) == NAMES[:1] + NAMES[2:]


def test_fit_on_shards_with_a_corrupt_sample_finishes(tmp_path, caplog):
    folder = write_dataset(tmp_path / "shapes", n=9, seed=1, config=ShapesConfig(size=64), progress=False)
    write_shards(folder, tmp_path / "sh", maxcount=3, progress=False)
    rewrite(tmp_path / "sh" / "shard-000001.tar", {"000004.image.png": b"junk"})
    with caplog.at_level(logging.WARNING):
        cli = cli_main(
            [
                "fit",
                "-c",
                "configs/debug/segmenter.yaml",
                f"--trainer.default_root_dir={tmp_path / 'runs'}",
                "--trainer.max_steps=2",
                "--data.shapesworld=null",
                "--data.train.dataset=shards",
                f"--data.train.root={tmp_path / 'sh'}",
                "--data.val.dataset=shards",
                f"--data.val.root={tmp_path / 'sh'}",
                "--data.val.limit=2",
                "--data.batch_size=4",
                "--data.max_bad_fraction=0.5",
            ]
        )
    assert cli.trainer.global_step == 2
    assert any("'000004'" in m and "shard-000001.tar" in m for m in bad_warnings(caplog))
