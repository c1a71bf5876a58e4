"""The Python API: ``autoseg.load(source, **overrides)``, calling the pipeline on images, ``Prediction`` helpers,
``save_pretrained`` / ``push_to_hub`` folders that load back identically (also through infer.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import autoseg
from autoseg.cli.infer import main as infer_main
from autoseg.config import to_dict
from autoseg.models.loading import ModelLoadError
from autoseg.utils.io import load_image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((REPO / "data" / "samples" / "shapes" / "images").glob("*.png"))


@pytest.fixture(scope="module")
def demo():
    return autoseg.load("demo")


@pytest.fixture(scope="module")
def demo_predictions(demo):
    return demo(SAMPLES)


def outputs(preds):
    return [(p.vocabulary, p.label_map) for p in preds]


def same(a, b) -> bool:
    return all(va == vb and np.array_equal(la, lb) for (va, la), (vb, lb) in zip(a, b, strict=True))


def test_import_is_cheap_and_lists_the_api():
    assert {"load", "Prediction", "AutoSegPipeline", "presets"} <= set(autoseg.__all__)
    assert "demo" in autoseg.presets()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = autoseg.nope


def test_load_demo_segments_the_shipped_samples(demo, demo_predictions):
    assert len(demo_predictions) == len(SAMPLES) == 6
    for path, pred in zip(SAMPLES, demo_predictions, strict=True):
        with Image.open(path) as im:
            assert pred.label_map.shape == (im.height, im.width)
        assert pred.vocabulary and pred.label_map.max() <= len(pred.vocabulary)
        for i, name in enumerate(pred.vocabulary, start=1):
            mask = pred.mask(name)
            assert mask.dtype == bool and np.array_equal(mask, pred.label_map == i)
            assert mask.mean() == pytest.approx(pred.pixel_fraction()[name])
        overlay = pred.overlay()
        assert overlay.width == pred.label_map.shape[1] and overlay.height > pred.label_map.shape[0]  # + legend
        record = json.loads(pred.to_json(str(path)))
        assert record["vocabulary"] == pred.vocabulary and record["image"] == str(path)
        assert record["size"] == [pred.label_map.shape[1], pred.label_map.shape[0]]
        with pytest.raises(KeyError, match="not in this prediction's vocabulary"):
            pred.mask("unicorn")


def test_images_may_be_paths_pil_images_or_arrays_one_or_many(demo, demo_predictions):
    pils = [load_image(p) for p in SAMPLES]
    assert same(outputs(demo(pils)), outputs(demo_predictions))
    arrays = [np.asarray(im) for im in pils]
    assert same(outputs(demo(arrays)), outputs(demo_predictions))
    one = demo(SAMPLES[0])  # a single image gives a single prediction
    assert isinstance(one, autoseg.Prediction) and one.label_map.shape == demo_predictions[0].label_map.shape
    with pytest.raises(ValueError, match="expected an H x W, H x W x 3 or H x W x 4 image array, got shape"):
        demo(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="expected a PIL image, a file path or a numpy array, got int"):
        demo([3])


def test_a_given_vocabulary_skips_captioning(demo):
    image = load_image(SAMPLES[0])
    pred = demo(image, vocabulary=["sky", "grass", "unicorn"])
    assert pred.vocabulary == ["sky", "grass", "unicorn"] and set(np.unique(pred.label_map)) <= {0, 1, 2, 3}
    direct = demo.segmenter.segment([image], [["sky", "grass", "unicorn"]])[0]
    assert np.array_equal(pred.label_map, direct)
    per_image = demo([image, image], vocabulary=[["sky"], ["grass", "sky"]])
    assert [p.vocabulary for p in per_image] == [["sky"], ["grass", "sky"]]
    with pytest.raises(ValueError, match="one list of names per image"):
        demo([image, image], vocabulary=[["sky"]])


def test_per_call_settings_are_arguments_and_leave_the_pipeline_alone(demo):
    image = load_image(SAMPLES[1])
    seeded = [demo(image, seed=s).vocabulary for s in (0, 5, 0)]
    assert seeded[0] == seeded[2] and demo.seed == 0
    strict = demo(image, threshold=0.999)
    assert (strict.label_map == 0).mean() > (demo(image).label_map == 0).mean()
    assert demo.takes_threshold


def test_keyword_overrides_and_sources():
    from autoseg.api import overrides_from_kwargs, resolve_config

    config, where = resolve_config("demo", overrides_from_kwargs({"seed": 3, "bboost": {"k_max": 14}}))
    assert (config.seed, config.bboost.k_min, config.bboost.k_max) == (3, 12, 14) and where.endswith("pipeline.yaml")
    kwargs = overrides_from_kwargs({"segmenter": "my/seg", "segmenter_backend": "sam3", "dtype": "bfloat16"})
    assert kwargs == {"segmenter": {"name": "sam3", "source": "my/seg"}, "dtype": "bfloat16"}
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['colour'\]; allowed: \[.*'seed'"):
        autoseg.load("demo", colour="red")
    with pytest.raises(FileNotFoundError, match="nothere.yaml: no such file or folder, and not a preset; expected a"):
        autoseg.load("nothere.yaml")
    with pytest.raises(ModelLoadError, match=r"pipeline 'someone/not-cached'.*hf download someone/not-cached"):
        autoseg.load("someone/not-cached")  # HF_HUB_OFFLINE is set by conftest


def test_save_pretrained_round_trip_is_identical_and_infer_reads_the_folder(demo, demo_predictions, tmp_path):
    folder = demo.save_pretrained(tmp_path / "my-demo")
    assert {p.name for p in folder.iterdir()} >= {"pipeline.yaml", "blip", "segmenter", "enhancer.safetensors"}
    saved = yaml.safe_load((folder / "pipeline.yaml").read_text())
    assert saved["blip"] == "./blip" and saved["segmenter"]["source"] == "./segmenter" and saved["device"] == "auto"
    assert saved["enhancer"] == "./enhancer.safetensors"
    assert {k: v for k, v in saved.items() if k not in ("blip", "enhancer", "device", "segmenter")} == {
        k: v for k, v in to_dict(demo.config).items() if k not in ("blip", "enhancer", "device", "segmenter")
    }
    moved = shutil.move(folder, tmp_path / "moved")  # self-contained: relative to its own YAML
    again = autoseg.load(moved)
    assert same(outputs(again(SAMPLES)), outputs(demo_predictions))
    out = tmp_path / "out"
    assert infer_main([str(SAMPLES[0].parent), "-o", str(out), "--config", str(moved)]) == 0
    written = [json.loads((out / f"{p.stem}.json").read_text())["vocabulary"] for p in SAMPLES]
    assert written == [p.vocabulary for p in demo_predictions]
    with pytest.raises(FileExistsError, match="exists and is not empty; choose a new folder or pass overwrite=True"):
        again.save_pretrained(moved)
    again.save_pretrained(moved, overwrite=True)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a saved pipeline"):
        again.save_pretrained(tmp_path / "photos", overwrite=True)
    assert (tmp_path / "photos" / "keep.txt").read_text() == "mine"


def test_push_to_hub_uploads_the_saved_folder_that_load_reads_back(demo, demo_predictions, tmp_path, monkeypatch):
    """Offline: a local folder stands in for the Hub (the huggingface_hub calls are redirected to it)."""
    import huggingface_hub

    hub = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create", repo_id, kwargs.get("private")))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)
        calls.append(("upload", repo_id, kwargs.get("commit_message")))
        return f"https://huggingface.co/{repo_id}/commit/1"

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if not (hub / repo_id).is_dir():
            raise FileNotFoundError(repo_id)
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    url = demo.push_to_hub("me/shapes-demo", private=True)
    assert url == "https://huggingface.co/me/shapes-demo/commit/1"
    assert calls == [("create", "me/shapes-demo", True), ("upload", "me/shapes-demo", "Upload AutoSeg pipeline")]
    assert "autoseg.load" in (hub / "me" / "shapes-demo" / "README.md").read_text()
    assert same(outputs(autoseg.load("me/shapes-demo")(SAMPLES)), outputs(demo_predictions))
