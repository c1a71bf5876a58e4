"""--segmenter-backend end to end: infer.py and eval.py with each backend on tiny local models, usage errors,
and a SAM 3 fine-tuned by train.py loading into infer.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from autoseg.cli.eval import main as eval_main
from autoseg.cli.infer import main as infer_main
from autoseg.cli.train import cli_main
from autoseg.models import scratch

DEBUG_PIPELINE = "configs/debug/pipeline.yaml"


@pytest.fixture(scope="module")
def backends(tmp_path_factory, tiny_clipseg_dir):
    """backend name -> a tiny local model directory for --segmenter."""
    root = tmp_path_factory.mktemp("backends")
    torch.manual_seed(0)
    sam3 = scratch.save(*scratch.make_sam3(), root / "sam3")
    gsam = scratch.save_grounded_sam(scratch.make_grounding_dino(), scratch.make_sam(), root / "grounded_sam")
    return {"clipseg": tiny_clipseg_dir, "sam3": sam3, "grounded_sam": gsam}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (48, 64), "b": (40, 40), "c": (70, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


def infer(photos, out, blip, *extra):
    return infer_main([str(photos), "-o", str(out), "--config", DEBUG_PIPELINE, "--blip", str(blip), *extra])


@pytest.mark.parametrize("backend", ["clipseg", "sam3", "grounded_sam"])
def test_infer_runs_with_each_backend(backend, backends, photos, tmp_path, tiny_blip_dir):
    out = tmp_path / "out"
    argv = ["--segmenter-backend", backend, "--segmenter", str(backends[backend]), "--seed", "1"]
    assert infer(photos, out, tiny_blip_dir, *argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["segmenter"]["name"] == backend
    named = 0
    for stem, size in {"a": (64, 48), "b": (40, 40), "c": (50, 70)}.items():
        with Image.open(out / f"{stem}.png") as im:
            labels = np.asarray(im)
            assert im.size == size
        vocabulary = json.loads((out / f"{stem}.json").read_text())["vocabulary"]
        assert labels.max() <= len(vocabulary)
        named += len(vocabulary) > 0
    assert named > 0  # the segmenter was asked about some names


def folder_dataset(root):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("thing\nstuff\n")
    for i, (h, w) in enumerate([(48, 64), (40, 56)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 2, (h, w)).astype(np.uint8), mode="L").save(root / "masks" / f"img{i}.png")
    return root


@pytest.mark.parametrize("backend", ["sam3", "grounded_sam"])
def test_eval_pipeline_mode_runs_with_each_new_backend(backend, backends, tmp_path, tiny_blip_dir):
    root = folder_dataset(tmp_path / "ds")
    report = tmp_path / "run" / "report.json"
    argv = ["--dataset", "folder", "--root", str(root), "--mapper", "exact", "--report", str(report), "--no-progress"]
    argv += ["--config", DEBUG_PIPELINE, "--blip", str(tiny_blip_dir), "--seed", "1"]
    argv += ["--segmenter-backend", backend, "--segmenter", str(backends[backend])]
    assert eval_main(argv) == 0
    result = json.loads(report.read_text())
    assert result["n_images"] == 2 and result["missing_predictions"] == []


def test_backend_usage_errors_exit_2_and_say_what_to_do(backends, photos, tmp_path, tiny_blip_dir, capsys):
    with pytest.raises(SystemExit) as err:
        infer(photos, tmp_path / "o1", tiny_blip_dir, "--segmenter-backend", "sam9")
    assert err.value.code == 2
    err = capsys.readouterr().err
    assert "--segmenter-backend: invalid choice: 'sam9' (choose from" in err
    assert all(name in err.splitlines()[-1] for name in ("clipseg", "sam3", "grounded_sam"))
    # a CLIPSeg directory given to the sam3 backend: caught from its config.json, before any weights load
    assert (
        infer(
            photos,
            tmp_path / "o2",
            tiny_blip_dir,
            "--segmenter-backend",
            "sam3",
            "--segmenter",
            str(backends["clipseg"]),
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "segmenter.source:" in err and "holds a 'clipseg' model but segmenter 'sam3' loads" in err
    assert "use --segmenter-backend clipseg" in err
    # the backend's default model, not downloaded here: the offline message at once
    assert infer(photos, tmp_path / "o3", tiny_blip_dir, "--segmenter-backend", "sam3") == 2
    err = capsys.readouterr().err
    assert "SAM 3 segmenter: could not load 'facebook/sam3'" in err and "--segmenter DIR" in err
    assert infer(photos, tmp_path / "o4", tiny_blip_dir, "--segmenter-backend", "grounded_sam") == 2
    assert "could not load 'IDEA-Research/grounding-dino-tiny'" in capsys.readouterr().err


def test_runtime_checks_read_config_json_to_match_models_to_backends(backends, monkeypatch):
    from transformers import PreTrainedModel

    from autoseg.config import ConfigError, load_config
    from autoseg.config_checks import check_runtime

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", None)  # only config.json files may be read
    for name, source in backends.items():
        check_runtime(load_config(DEBUG_PIPELINE, {"segmenter": {"name": name, "source": str(source)}}))
    bad = {"segmenter": {"name": "grounded_sam", "source": str(backends["sam3"])}}
    with pytest.raises(ConfigError, match=r"segmenter.source: .* holds a 'sam3' model .*use --segmenter-backend sam3"):
        check_runtime(load_config(DEBUG_PIPELINE, bad), "c.yaml", bad, "command line")
    bad = {
        "segmenter": {
            "name": "grounded_sam",
            "source": str(backends["grounded_sam"]),
            "sam_source": str(backends["clipseg"]),
        }
    }
    with pytest.raises(
        ConfigError, match=r"segmenter.sam_source: .* holds a 'clipseg' model; grounded_sam needs a SAM"
    ):
        check_runtime(load_config(DEBUG_PIPELINE, bad))
    bad = {"segmenter": {"name": "grounded_sam", "sam_source": "/no/such/sam"}}
    with pytest.raises(ConfigError, match=r"segmenter.sam_source: no such directory: /no/such/sam"):
        check_runtime(load_config(DEBUG_PIPELINE, bad))


def test_sam3_fine_tuned_by_train_py_loads_into_infer(tmp_path, photos, tiny_blip_dir):
    argv = [
        "fit",
        "-c",
        "configs/debug/segmenter_sam3.yaml",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        f"--data.shapesworld.root={tmp_path / 'shapes'}",
        "--data.shapesworld.n_train=8",
        "--data.shapesworld.n_val=4",
        "--data.batch_size=4",
        "--trainer.max_steps=4",
    ]
    cli = cli_main(argv)
    assert cli.trainer.global_step == 4
    export = tmp_path / "runs" / "lightning_logs" / "version_0" / "export" / "last" / "segmenter"
    assert (export / "model.safetensors").is_file()
    last = torch.load(export.parents[2] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {k.split(".")[2] for k in last["state_dict"]} == {"detr_encoder", "mask_decoder"}  # frozen parts left out
    out = tmp_path / "out"
    assert infer(photos, out, tiny_blip_dir, "--segmenter-backend", "sam3", "--segmenter", str(export)) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["segmenter"]["source"] == str(export)
