"""Checkpoints and weights from untrusted or damaged files: no code runs, and every failure is one clear message.

``train.py --ckpt_path`` takes local files and URLs (served here from 127.0.0.1); both are loaded with
``torch.load(weights_only=True)``. Damaged ``.ckpt`` / ``.safetensors`` files and model directories give one line that
names the file and what was expected.
"""

import functools
import http.server
import pathlib
import random
import re
import shutil
import threading

import pytest
import torch

from autoseg.cli import infer
from autoseg.cli.train import cli_main, main
from autoseg.lit import SegmenterModule
from autoseg.lit.checkpoints import CheckpointError, load_checkpoint
from autoseg.models.blip import BlipCaptioner
from autoseg.models.enhancer import EmbeddingEnhancer, EnhancerConfig, load_enhancer, save_enhancer
from autoseg.models.loading import ModelLoadError
from autoseg.models.segmenters import CLIPSegSegmenter


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint does on a ``weights_only=False`` load."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "code ran")


def debug_args(root, *extra):
    """The tiny segmenter config on 8 + 4 ShapesWorld images (batches of 4), writing only under ``root``."""
    return [
        "-c",
        "configs/debug/segmenter.yaml",
        f"--trainer.default_root_dir={root / 'runs'}",
        f"--data.shapesworld.root={root / 'shapes'}",
        "--data.shapesworld.n_train=8",
        "--data.shapesworld.n_val=4",
        "--data.batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step segmenter run: (root, its last.ckpt)."""
    root = tmp_path_factory.mktemp("segmenter")
    cli_main(["fit", *debug_args(root, "--trainer.max_steps=2")])
    return root, root / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep stderr for the messages under test
        pass


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 (free port) for the files of ``tmp_path / "www"``; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """Lightning's old remote path cached downloads in ``$TORCH_HOME/hub``: keep it in tmp_path and check it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


def test_a_remote_checkpoint_with_a_pickle_payload_is_refused_before_any_code_runs(
    trained, served, tmp_path, torch_home, capsys
):
    root, _ = trained
    www, url = served
    marker = tmp_path / "marker.txt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "x": Payload(marker)}, www / "evil.ckpt")
    capsys.readouterr()

    code = main(["validate", *debug_args(root), f"--ckpt_path={url}/evil.ckpt"])
    assert code == 2 and not marker.exists()
    message = one_line_error(capsys)
    assert f"{url}/evil.ckpt: refused" in message and "could run code" in message
    with pytest.raises(CheckpointError, match="refused"):
        SegmenterModule.load_from_checkpoint(f"{url}/evil.ckpt")
    assert not marker.exists() and not torch_home.exists()

    torch.load(www / "evil.ckpt", weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.read_text() == "code ran"


def test_a_remote_checkpoint_loads_by_the_rules_of_a_local_one(trained, served, torch_home):
    root, last = trained
    www, url = served
    shutil.copy(last, www / "last.ckpt")
    local = cli_main(["validate", *debug_args(root), f"--ckpt_path={last}"])
    remote = cli_main(["validate", *debug_args(root), f"--ckpt_path={url}/last.ckpt"])
    assert remote.trainer.callback_metrics["val/mIoU"] == local.trainer.callback_metrics["val/mIoU"]

    module = SegmenterModule.load_from_checkpoint(f"{url}/last.ckpt")
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in state.items():
        assert torch.equal(module.state_dict()[key], value), key
    assert not torch_home.exists()  # read into memory, never cached under a name another URL could reuse

    with pytest.raises(CheckpointError, match="could not download"):
        load_checkpoint(f"{url}/missing.ckpt")


def test_any_random_bytes_give_a_checkpoint_error_naming_the_file(tmp_path):
    """Unpickling arbitrary bytes can fail with any exception type (IndexError, KeyError, ...); each is reported."""
    for seed in range(200):
        path = tmp_path / f"{seed}.ckpt"
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: cannot be read: damaged, truncated or not a checkpoint ("), message
        assert "\n" not in message


def damaged_files(last: pathlib.Path, folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """A real checkpoint's damaged variants and other files that are not checkpoints."""
    data = last.read_bytes()
    files = {
        "random": random.Random(2).randbytes(4096),  # seed 2: the unpickler fails with IndexError
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    out = {}
    for name, content in files.items():
        out[name] = folder / f"{name}.ckpt"
        out[name].write_bytes(content)
    out["state_dict"] = folder / "state_dict.ckpt"
    torch.save(torch.load(last, weights_only=True)["state_dict"], out["state_dict"])
    out["safetensors"] = save_enhancer(
        EmbeddingEnhancer(EnhancerConfig(dim=8, width=8, num_heads=2)), folder / "h.safetensors"
    )
    return out


EXPECTED_SAYS = {
    "random": "cannot be read: damaged, truncated or not a checkpoint",
    "truncated": "cannot be read: damaged, truncated or not a checkpoint (PytorchStreamReader",
    "empty": "cannot be read: damaged, truncated or not a checkpoint (the file is empty",
    "state_dict": "found a bare state dict",
    "safetensors": "safetensors weights file",
}


@pytest.mark.parametrize("kind", list(EXPECTED_SAYS))
def test_a_damaged_or_foreign_checkpoint_gives_one_line_naming_the_file(kind, trained, tmp_path, capsys):
    root, last = trained
    bad = damaged_files(last, tmp_path)[kind]
    capsys.readouterr()
    assert main(["validate", *debug_args(root), f"--ckpt_path={bad}"]) == 2
    message = one_line_error(capsys)
    assert f"{bad}:" in message and EXPECTED_SAYS[kind] in message and "written by `train.py fit`" in message
    with pytest.raises(CheckpointError, match=re.escape(EXPECTED_SAYS[kind])):
        SegmenterModule.load_from_checkpoint(bad)


def test_resuming_from_a_missing_checkpoint_names_it(trained, tmp_path, capsys):
    root, _ = trained
    capsys.readouterr()
    assert main(["fit", *debug_args(root), f"--ckpt_path={tmp_path / 'nope.ckpt'}"]) == 2
    assert f"{tmp_path / 'nope.ckpt'}: checkpoint not found" in one_line_error(capsys)


def truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_model_directory_with_truncated_weights_is_a_model_load_error(tiny_blip_dir, tiny_clipseg_dir, tmp_path):
    blip, clipseg = (shutil.copytree(d, tmp_path / name) for d, name in ((tiny_blip_dir, "b"), (tiny_clipseg_dir, "c")))
    truncate(blip / "model.safetensors")
    truncate(clipseg / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"weights in {blip} are damaged or truncated \\(model.safetensors"):
        BlipCaptioner.from_pretrained(str(blip))
    with pytest.raises(ModelLoadError, match=f"weights in {clipseg} are damaged or truncated"):
        CLIPSegSegmenter.from_pretrained(str(clipseg))


def infer_args(tmp_path, blip, clipseg):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    args = [str(tmp_path / "red.png"), "-o", str(tmp_path / "out"), "--config", "configs/debug/pipeline.yaml"]
    return [*args, "--blip", str(blip), "--segmenter", str(clipseg)]


def test_infer_reports_a_truncated_segmenter_directory_in_one_line(tiny_blip_dir, tiny_clipseg_dir, tmp_path, capsys):
    clipseg = shutil.copytree(tiny_clipseg_dir, tmp_path / "clipseg")
    truncate(clipseg / "model.safetensors")
    assert infer.main(infer_args(tmp_path, tiny_blip_dir, clipseg)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "Error" in line or "error" in line]
    assert len(errors) == 1 and errors[0].startswith("infer.py: error: CLIPSeg segmenter: "), errors
    assert f"weights in {clipseg} are damaged or truncated" in errors[0]


@pytest.mark.parametrize("kind", ["truncated", "random", "directory"])
def test_infer_reports_a_damaged_enhancer_file_in_one_line(kind, tiny_blip_dir, tiny_clipseg_dir, tmp_path, capsys):
    head = save_enhancer(EmbeddingEnhancer(EnhancerConfig(dim=32, width=8, num_heads=2)), tmp_path / "e.safetensors")
    if kind == "truncated":
        truncate(head)
    elif kind == "random":
        head.write_bytes(random.Random(2).randbytes(4096))
    else:
        head.unlink()
        head.mkdir()
    assert infer.main([*infer_args(tmp_path, tiny_blip_dir, tiny_clipseg_dir), "--enhancer", str(head)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "Error" in line or "error" in line]
    assert len(errors) == 1 and errors[0].startswith("infer.py: error: ") and str(head) in errors[0], errors
    with pytest.raises(ValueError, match="is a directory" if kind == "directory" else "damaged, truncated") as e:
        load_enhancer(head)
    assert str(e.value).startswith(f"{head}: ") and "exported by `train.py fit`" in str(e.value)
