"""Joint image + mask transforms and the data module over folders, shards, image folders and generated ShapesWorld."""

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.data.datamodules import DataSource, SegmentationDataModule, ShapesWorldSpec, shard_classes
from autoseg.data.transforms import SegmentationTransform, collate, nearest_index

COLOURS = np.array([[250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], dtype=np.uint8)


def coded_item(h=90, w=120, seed=0):
    """An image whose colour encodes its class: pixel colour = COLOURS[mask], blocks of random classes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, (6, 8))
    mask = np.kron(blocks, np.ones((h // 6, w // 8), dtype=np.int64))
    mask[:5, :5] = 255  # an unscored corner (drawn black)
    image = np.where((mask == 255)[..., None], 0, COLOURS[np.minimum(mask, 3)])
    return {"image": Image.fromarray(image.astype(np.uint8)), "mask": mask, "name": "coded", "path": "x.png"}


def decode(image: torch.Tensor) -> np.ndarray:
    """Class of the nearest code colour of each pixel of a ``3 x H x W`` [0, 1] tensor (black -> 255)."""
    rgb = (image.permute(1, 2, 0).numpy() * 255)[..., None, :]  # H x W x 1 x 3
    codes = np.concatenate([COLOURS, [[0, 0, 0]]]).astype(np.float32)
    idx = np.abs(rgb - codes).sum(-1).argmin(-1)
    return np.where(idx == 4, 255, idx)


@pytest.mark.parametrize("seed", range(4))
def test_training_augmentation_moves_image_and_mask_together(seed):
    torch.manual_seed(seed)
    item = coded_item(seed=seed)
    out = SegmentationTransform(48, train=True, scale=(0.2, 1.0))(item)
    assert out["image"].shape == (3, 48, 48) and out["image"].dtype == torch.float32
    assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
    assert out["mask"].shape == (48, 48) and out["mask"].dtype == torch.int64
    assert set(out["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no new ids
    # pixels agree with the mask except along block edges (the image is antialiased, the mask is not)
    agree = (decode(out["image"]) == out["mask"].numpy()).mean()
    assert agree > 0.85, agree
    assert out["orig_size"].tolist() == [90, 120]


@pytest.mark.parametrize(
    ("train", "size", "scale"), [(True, 48, (0.2, 1.0)), (True, 64, (0.8, 1.0)), (False, 30, None)]
)
def test_outputs_equal_torchvisions_v2_pipeline(train, size, scale):
    """The same draws and outputs as v2.Compose on tv_tensors (what the transform ran before, and the reference)."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip()] if train else []
    reference = v2.Compose(
        [
            *(ops or [v2.Resize((size, size), antialias=True)]),
            v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        ]
    )
    ours = SegmentationTransform(size, train=train, **({"scale": scale} if train else {}))
    for seed in range(12):
        item = coded_item(seed=seed)
        sample = {
            "image": tv_tensors.Image(v2.functional.pil_to_tensor(item["image"])),
            "mask": tv_tensors.Mask(torch.as_tensor(item["mask"], dtype=torch.int64)),
        }
        torch.manual_seed(seed)
        expected = reference(sample)
        for mask in (item["mask"], item["mask"].astype(np.uint8)):  # as read, and as the decoded-item cache keeps it
            torch.manual_seed(seed)
            out = ours({**item, "mask": mask})
            assert torch.equal(out["image"], expected["image"].as_subclass(torch.Tensor)), seed
            assert torch.equal(out["mask"], expected["mask"].as_subclass(torch.Tensor)), seed
            assert out["mask"].dtype == torch.int64
        assert torch.rand(1).item() == (torch.manual_seed(seed), reference(sample), torch.rand(1).item())[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_nearest_index_is_where_torchs_nearest_resize_reads(dtype):
    """Every (input, output) length up to 160 x 200: the source pixel ``F.interpolate(mode="nearest")`` takes for each
    output pixel (the resize torchvision runs on label maps, cast to float32 or kept uint8)."""
    for n_in in range(1, 161):
        source = torch.arange(n_in).remainder(256).to(dtype)[None, None, None].expand(1, 1, 2, n_in)
        for n_out in range(1, 201):
            read = torch.nn.functional.interpolate(source, size=(2, n_out), mode="nearest")[0, 0, 0].long()
            assert torch.equal(read, nearest_index(n_in, n_out).remainder(256)), (n_in, n_out)


def test_flip_only_changes_both_identically():
    torch.manual_seed(0)
    item = coded_item()
    t = SegmentationTransform(60, train=True, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    flips = {bool((decode(o["image"]) == o["mask"].numpy()).mean() > 0.9) for o in (t(item) for _ in range(6))}
    assert flips == {True}


def test_eval_transform_resizes_to_a_square_without_new_labels():
    item = coded_item()
    out = SegmentationTransform(30)(item)
    assert out["mask"].shape == (30, 30) and out["image"].shape == (3, 30, 30)
    assert set(out["mask"].unique().tolist()) == set(np.unique(item["mask"]).tolist())
    assert (decode(out["image"]) == out["mask"].numpy()).mean() > 0.85
    # a resize keeps every block where it was: the top-left block's class fills the top-left corner
    assert (out["mask"][2:5, 2:4] == int(item["mask"][10, 10])).all()


def test_transform_rejects_a_mask_of_another_size():
    item = coded_item()
    item["mask"] = item["mask"][:-1]
    with pytest.raises(ValueError, match=r"x.png: mask \(89, 120\) and image \(90, 120\)"):
        SegmentationTransform(32)(item)


def test_collate_stacks_tensors_and_lists_names():
    t = SegmentationTransform(32)
    batch = collate([t(coded_item(seed=s)) for s in range(3)])
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 32, 32)
    assert batch["name"] == ["coded"] * 3 and batch["orig_size"].shape == (3, 2)


def write_folder(root, n=5, size=(40, 56)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("red\ngreen\nblue\nyellow\n")
    for i in range(n):
        item = coded_item(*size, seed=i)
        item["image"].save(root / "images" / f"img{i}.png")
        Image.fromarray(item["mask"].astype(np.uint8)).save(root / "masks" / f"img{i}.png")
    return root


def test_folder_datamodule_batches_and_links(tmp_path):
    root = write_folder(tmp_path / "ds")
    dm = SegmentationDataModule(
        train=DataSource("folder", str(root)),
        val=DataSource("folder", str(root), limit=3),
        image_size=32,
        batch_size=2,
        num_workers=0,
    )
    assert dm.classes == ["red", "green", "blue", "yellow"] and dm.ignore_index == 255
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert [len(b["name"]) for b in train] == [2, 2]  # 5 items, ragged last batch dropped
    val = list(dm.val_dataloader())
    assert [b["name"] for b in val] == [["img0", "img1"], ["img2"]]
    assert val[0]["image"].shape == (2, 3, 32, 32) and val[0]["mask"].dtype == torch.int64


def test_cached_training_items_equal_the_read_ones_and_outlive_the_files(tmp_path):
    import shutil

    root = write_folder(tmp_path / "ds")

    def batches(cache):
        dm = SegmentationDataModule(
            train=DataSource("folder", str(root)), image_size=32, batch_size=2, num_workers=0, cache_decoded=cache
        )
        dm.setup("fit")
        return dm, [b for _ in range(2) for b in dm.train_dataloader()]  # two epochs

    _, read = batches(False)
    dm, cached = batches(True)
    assert len(read) == len(cached) == 4
    for a, b in zip(read, cached, strict=True):
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert b["mask"].dtype == torch.int64  # the cache keeps uint8 labels; the transform returns int64
    shutil.rmtree(root / "images")  # every item was read once: the cache serves them
    again = list(dm.train_dataloader())
    assert len(again) == 2 and again[0]["image"].shape == (2, 3, 32, 32)


def test_datamodule_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="data source 'voc' unknown; choose a dataset reader"):
        DataSource("voc", "x")
    with pytest.raises(ValueError, match="'root' is empty"):
        DataSource("folder", "")
    with pytest.raises(ValueError, match="an 'images' source has no masks"):
        SegmentationDataModule(val=DataSource("images", str(tmp_path)))
    with pytest.raises(ValueError, match="no train / val / test source with masks"):
        _ = SegmentationDataModule(predict=DataSource("images", str(tmp_path))).classes
    with pytest.raises(ValueError, match="no 'train' data configured"):
        SegmentationDataModule(val=DataSource("folder", str(write_folder(tmp_path / "f")))).train_dataloader()


def test_shapesworld_is_generated_once_into_a_keyed_cache(tmp_path):
    spec = ShapesWorldSpec(root=str(tmp_path / "cache"), seed=3, n_train=4, n_val=2, size=32)
    dm = SegmentationDataModule(shapesworld=spec, image_size=32, batch_size=2, num_workers=0)
    assert dm.classes[:2] == ["sky", "grass"] and len(dm.classes) == 10
    dm.prepare_data()
    folder = spec.folder()
    train_files = sorted(p.name for p in (folder / "train" / "images").iterdir())
    val_files = sorted(p.name for p in (folder / "val" / "images").iterdir())
    assert train_files == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert val_files == ["000004.png", "000005.png"]  # held-out indices
    stamp = (folder / "train" / "images" / "000000.png").stat().st_mtime_ns
    dm.prepare_data()
    assert (folder / "train" / "images" / "000000.png").stat().st_mtime_ns == stamp  # not regenerated
    other = ShapesWorldSpec(root=str(tmp_path / "cache"), seed=4, n_train=4, n_val=2, size=32)
    assert other.folder() != folder
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and int(batch["mask"].max()) < 10


def test_shard_datamodule_reads_what_the_converter_wrote(tmp_path):
    from autoseg.data.shards import write_shards

    root = write_folder(tmp_path / "ds", n=5)
    write_shards(root, tmp_path / "shards", maxcount=2, progress=False)
    assert shard_classes(str(tmp_path / "shards")) == ["red", "green", "blue", "yellow"]
    pattern = str(tmp_path / "shards" / "shard-{000000..000002}.tar")
    dm = SegmentationDataModule(
        train=DataSource("shards", str(tmp_path / "shards")),
        val=DataSource("shards", pattern),
        image_size=24,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=4,
    )
    assert dm.classes == ["red", "green", "blue", "yellow"]
    val = list(dm.val_dataloader())
    assert [n for b in val for n in b["name"]] == [f"img{i}" for i in range(5)]
    train_names = sorted(n for b in dm.train_dataloader() for n in b["name"])
    assert train_names == [f"img{i}" for i in range(5)]
    # the folder's masks arrive unchanged (up to the resize)
    item = coded_item(40, 56, seed=0)
    assert set(val[0]["mask"][0].unique().tolist()) <= set(np.unique(item["mask"]).tolist())
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "a.tar").write_bytes((tmp_path / "shards" / "shard-000000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="no class list beside the shards"):
        shard_classes(str(tmp_path / "bare" / "a.tar"))


def test_image_folder_predict_source_keeps_names_and_sizes(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(tmp_path / "imgs" / "a.jpg")
    Image.new("L", (16, 40)).save(tmp_path / "imgs" / "sub" / "b.png")
    root = write_folder(tmp_path / "ds")
    dm = SegmentationDataModule(
        val=DataSource("folder", str(root)), predict=DataSource("images", str(tmp_path / "imgs")), image_size=16
    )
    dm.hparams.num_workers = 0
    batch = next(iter(dm.predict_dataloader()))
    assert batch["name"] == ["a", "sub/b"] and "mask" not in batch
    assert batch["orig_size"].tolist() == [[20, 30], [40, 16]]
    assert batch["image"].shape == (2, 3, 16, 16)
