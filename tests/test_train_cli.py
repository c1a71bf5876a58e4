"""train.py (LightningCLI) on the debug configs: fit, resume, export, validate, predict, bf16-mixed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import autoseg
from autoseg.cli.train import cli_main
from autoseg.lit import EnhancerModule
from autoseg.models.enhancer import load_enhancer
from autoseg.models.segmenters import CLIPSegSegmenter
from autoseg.outputs import read_prediction


def debug_args(kind, root, *extra):
    """A short debug run: 8 training images in batches of 4 (2 steps per epoch), 4 validation images."""
    return [
        "-c",
        f"configs/debug/{kind}.yaml",
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--data.shapesworld.root={root / 'shapes'}",
        "--data.shapesworld.n_train=8",
        "--data.shapesworld.n_val=4",
        "--data.batch_size=4",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


def scalars(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


@pytest.fixture(scope="module")
def enhancer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("enhancer")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cli = cli_main(["fit", *debug_args("enhancer", root, "--trainer.max_steps=4")])
    torch.set_num_threads(n)
    return root, cli.trainer


def test_fit_writes_checkpoints_events_config_and_export(enhancer_run):
    root, trainer = enhancer_run
    log_dir = root / "runs" / "lightning_logs" / "version_0"
    assert trainer.global_step == 4 and trainer.log_dir == str(log_dir)
    ckpts = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(c.startswith("best-step") for c in ckpts)
    assert list(log_dir.glob("events.out.tfevents.*"))
    config = (log_dir / "config.yaml").read_text()
    assert "autoseg.lit.EnhancerModule" in config and "max_steps: 4" in config  # the resolved config

    tags, images = scalars(log_dir)
    for tag in ("train/loss", "val/cluster_mIoU", "val/cluster_mIoU_identity", "lr-AdamW/pg1"):
        assert tag in tags, sorted(tags)
    assert [s for s, _ in tags["val/cluster_mIoU"]] == [1, 3]  # one validation per epoch of 2 steps
    assert len({v for _, v in tags["val/cluster_mIoU_identity"]}) == 1  # computed once
    lrs = [v for _, v in tags["lr-AdamW/pg1"]]
    assert lrs[0] != lrs[-1]  # the timm schedule moves the learning rate
    assert any(t.startswith("val/overlay_image_gt_identity_enhanced/") for t in images)

    last = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert all(k.startswith("enhancer.") for k in last["state_dict"])  # frozen BLIP left out
    head = load_enhancer(log_dir / "export" / "last" / "enhancer.safetensors")
    for k, v in head.state_dict().items():
        assert torch.equal(v, last["state_dict"][f"enhancer.{k}"])
    assert (log_dir / "export" / "best" / "enhancer.safetensors").is_file()


def test_checkpoint_loads_without_a_trainer(enhancer_run):
    root, _ = enhancer_run
    path = root / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    module = EnhancerModule.load_from_checkpoint(path, map_location="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert module.hparams.classes[:2] == ["sky", "grass"] and module.hparams.blip == "scratch:tiny"
    assert torch.equal(module.enhancer.proj_out.weight, state["enhancer.proj_out.weight"])
    assert module.identity_miou is not None


def test_resume_continues_the_step_count(enhancer_run):
    root, _ = enhancer_run
    last = root / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=True)
    cli = cli_main(["fit", *debug_args("enhancer", root, "--trainer.max_steps=6"), f"--ckpt_path={last}"])
    assert cli.trainer.global_step == 6
    tags, _ = scalars(root / "runs" / "lightning_logs" / "version_1")
    assert min(s for s, _ in tags["train/loss"]) > 4  # logging picks up after step 4
    # the identity baseline comes from the checkpoint, not a new pass
    assert tags["val/cluster_mIoU_identity"][0][1] == pytest.approx(before["autoseg_cluster_miou_identity"])


def test_segmenter_fit_exports_a_directory_the_loader_reads_then_validate_and_predict(tmp_path):
    cli = cli_main(["fit", *debug_args("segmenter", tmp_path, "--trainer.max_steps=2")])
    log_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert cli.trainer.global_step == 2
    exported = log_dir / "export" / "last" / "segmenter"
    assert (exported / "model.safetensors").is_file()
    loaded = CLIPSegSegmenter.from_pretrained(str(exported), templates=["a photo of a {}."])
    module = cli.model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(x, ["sky", "star"]), module.segmenter.logits(x, ["sky", "star"]))

    ckpt = str(log_dir / "checkpoints" / "last.ckpt")
    val = cli_main(["validate", *debug_args("segmenter", tmp_path), f"--ckpt_path={ckpt}"])
    assert 0.0 <= val.trainer.callback_metrics["val/mIoU"].item() <= 1.0

    out = tmp_path / "predictions"
    cli_main(
        [
            "predict",
            *debug_args("segmenter", tmp_path),
            f"--ckpt_path={ckpt}",
            "--trainer.callbacks+=autoseg.lit.callbacks.PredictionWriter",
            f"--trainer.callbacks.output_dir={out}",
        ]
    )
    label_map, vocabulary = read_prediction(out, "000008")  # first validation image (indices after the 8 train)
    assert vocabulary == module.hparams.classes
    assert label_map.shape == (64, 64) and 1 <= label_map.min() and label_map.max() <= len(vocabulary)
    assert json.loads((out / "000008.json").read_text())["vocabulary"] == vocabulary
    assert json.loads((out / "manifest.json").read_text())["complete"]
    # predict is the pipeline's segment stage: the exported weights through autoseg.load give the same label map
    seg = autoseg.load(
        None, blip="scratch:tiny", device="cpu", segmenter={"source": str(exported), "templates": ["a photo of a {}."]}
    )
    image = next(tmp_path.glob("shapes/**/images/000008.png"))
    np.testing.assert_array_equal(seg(image, vocabulary=vocabulary).label_map, label_map)


def test_enhancer_predict_runs_the_pipeline_with_its_head_as_infer_does(enhancer_run, tmp_path):
    root, _ = enhancer_run
    log_dir = root / "runs" / "lightning_logs" / "version_0"
    pipeline = tmp_path / "pipeline.yaml"
    debug = yaml.safe_load(open("configs/debug/pipeline.yaml"))
    debug["segmenter"]["source"] = "scratch:tiny"
    pipeline.write_text(yaml.safe_dump(debug))
    out = tmp_path / "predictions"
    cli_main(
        [
            "predict",
            *debug_args("enhancer", root),
            f"--ckpt_path={log_dir / 'checkpoints' / 'last.ckpt'}",
            f"--model.init_args.predict_pipeline={pipeline}",
            "--trainer.callbacks+=autoseg.lit.callbacks.PredictionWriter",
            f"--trainer.callbacks.output_dir={out}",
        ]
    )
    images = sorted(root.glob("shapes/**/val/images/*.png")) or sorted(root.glob("shapes/**/images/00000[89].png"))
    head = log_dir / "export" / "last" / "enhancer.safetensors"
    seg = autoseg.load(pipeline, blip="scratch:tiny", enhancer=str(head))
    preds = seg(images)
    assert preds and len(preds) == len(list(out.glob("*.json"))) - 1  # + manifest.json
    for image, pred in zip(images, preds, strict=True):
        label_map, vocabulary = read_prediction(out, image.stem)
        assert vocabulary == pred.vocabulary
        np.testing.assert_array_equal(label_map, pred.label_map)


def test_bf16_mixed_runs_on_cpu(tmp_path):
    cli = cli_main(
        ["fit", *debug_args("segmenter", tmp_path, "--trainer.max_steps=2", "--trainer.precision=bf16-mixed")]
    )
    assert cli.trainer.global_step == 2 and cli.trainer.precision == "bf16-mixed"
    loss = cli.trainer.callback_metrics["train/loss"]
    assert np.isfinite(loss.item())
    assert (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_bad_config_value_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", *debug_args("enhancer", tmp_path, "--model.init_args.head_width=abc")])
    assert "head_width" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_the_metric(tmp_path):
    """2 gloo processes through a launch script (DDP re-executes sys.argv); both ranks log the same figures, and
    they equal a single-process validation of the final weights (4 validation images split 2 + 2, no padding)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "tests/ddp_train.py", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [4, 4]
    for key in ("val/cluster_mIoU", "val/cluster_mIoU_identity", "val/loss"):
        assert ranks[0]["metrics"][key] == ranks[1]["metrics"][key]

    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    single = cli_main(
        [
            "validate",
            "-c",
            "configs/debug/enhancer.yaml",
            f"--trainer.default_root_dir={tmp_path / 'single'}",
            f"--data.shapesworld.root={tmp_path / 'shapes'}",
            "--data.shapesworld.n_train=16",
            "--data.shapesworld.n_val=4",
            "--data.batch_size=4",
            f"--ckpt_path={last}",
        ]
    )
    value = single.trainer.callback_metrics["val/cluster_mIoU"].item()
    assert value == pytest.approx(ranks[0]["metrics"]["val/cluster_mIoU"], abs=1e-6)


@pytest.mark.parametrize("kind", ["enhancer", "segmenter"])
def test_full_configs_parse(kind, capsys):
    """The GPU configs need real weights and data to run; here they must at least parse and resolve."""
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", "-c", f"configs/{kind}.yaml", "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"class_path: autoseg.lit.{kind.capitalize()}Module" in printed and "precision: bf16-mixed" in printed


def test_prediction_writer_commits_through_the_one_writer_and_resumes(tmp_path):
    """Shard samples have no image path: the pipeline gets the model input resized to the original size. Outputs are
    committed with status lines and a manifest; with skip_existing, complete outputs are not predicted again."""
    import json
    from types import SimpleNamespace

    from autoseg.lit.base import original_image
    from autoseg.lit.callbacks import PredictionWriter
    from autoseg.outputs import Prediction

    batch = {
        "image": torch.rand(1, 3, 16, 16),
        "orig_size": torch.tensor([[30, 40]]),
        "name": ["shard/key"],
        "path": [""],
    }
    image = original_image(batch, 0)
    assert image.size == (40, 30)
    label_map = np.zeros((30, 40), np.int32)
    label_map[:, 20:] = 2
    trainer = SimpleNamespace(global_rank=0, is_global_zero=True, strategy=SimpleNamespace(barrier=lambda *a: None))
    module = SimpleNamespace(trainer=SimpleNamespace(callbacks=[]))
    for skip, prediction in ((False, Prediction(["sky", "star"], label_map, image=image)), (True, None)):
        writer = PredictionWriter(str(tmp_path), skip_existing=skip)
        assert writer.is_done("shard/key") is skip  # the first run wrote it; only a skip_existing run keeps it
        writer.on_predict_start(trainer, module)
        writer.write_on_batch_end(trainer, module, [prediction], None, batch, 0)
        writer.on_predict_end(trainer, module)
        got, vocabulary = read_prediction(tmp_path, "shard/key")
        assert vocabulary == ["sky", "star"]
        np.testing.assert_array_equal(got, label_map)
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest["complete"] and manifest["module"] == "SimpleNamespace"
        assert [(e["output"], e["status"], e.get("skipped", False)) for e in manifest["inputs"]] == [
            ("shard/key", "ok", skip)
        ]
    assert (tmp_path / "shard" / "key_overlay.jpg").is_file()


def test_model_load_errors_are_one_line_naming_the_training_setting(tmp_path, capsys):
    from autoseg.cli.train import main

    missing = tmp_path / "nope"
    code = main(["fit", *debug_args("segmenter", tmp_path, f"--model.init_args.segmenter={missing}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        f"train.py: error: CLIPSeg segmenter: no such directory: {missing} (pass a local directory with "
        "--model.init_args.segmenter)"
    )
    assert not any("Traceback" in line for line in err)


def test_optimizer_flags_are_not_offered_where_the_module_decides(tmp_path, capsys):
    from autoseg.cli.train import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", *debug_args("segmenter", tmp_path, "--optimizer=Adam")])
    assert stop.value.code == 2 and "unrecognized arguments: --optimizer=Adam" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    shown = capsys.readouterr().out
    assert stop.value.code == 0 and "--trainer" in shown
    assert not any(flag in shown for flag in ("--optimizer ", "--optimizer.", "--lr_scheduler"))


def test_fit_ends_with_one_line_of_its_figures(tmp_path, capsys):
    from autoseg.cli.train import main

    assert main(["fit", *debug_args("segmenter", tmp_path, "--trainer.max_steps=2")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fit done after 2 steps: ") and "weights exported to" in last
    logged, _ = scalars(tmp_path / "runs" / "lightning_logs" / "version_0")
    final = logged["val/mIoU"][-1][1]  # what TensorBoard recorded last
    assert f"val/mIoU {final:.4g}" in last
    best = max(v for _, v in logged["val/mIoU"])
    assert f"best val/mIoU {best:.4g}" in last
