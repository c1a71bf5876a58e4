"""What survives what: kills, full disks, hostile paths, oversized and broken files, two runs into one folder.

Each test reproduces one defect of issue 9 (it failed before the fix); the kill/resume chains run ``infer.py`` and
``eval.py`` in a subprocess that SIGKILLs itself at a chosen file commit (``tests/crash_run.py``).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autoseg import outputs
from autoseg.cli.eval import main as eval_main
from autoseg.cli.infer import main as infer_main
from autoseg.data.datasets import build_dataset
from autoseg.outputs import RunManifest, prediction_complete, read_status_lines
from autoseg.utils.io import load_image

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = str(ROOT / "configs" / "debug" / "pipeline.yaml")


def png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG that declares ``width x height`` grey pixels but holds one row (a few hundred bytes on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def photo(path: Path, w: int, h: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2] = rng.integers(0, 255, 3)
    arr[h // 2 :] = rng.integers(0, 255, 3)
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
    Image.fromarray(arr).save(path)


def make_photos(folder: Path, n: int = 5) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(folder / f"p{i}.png", 40 + 4 * i, 32 + 2 * i, i)
    return [f"p{i}" for i in range(n)]


def infer(inputs, out, blip, seg, *extra) -> int:
    argv = [str(inputs), "-o", str(out), "--config", DEBUG_CONFIG, "--blip", str(blip), "--segmenter", str(seg)]
    return infer_main([*argv, "--seed", "3", *extra])


def snapshot(out: Path, stems) -> dict:
    """The outputs of ``stems`` with the per-run timing removed from the JSON."""
    got = {}
    for s in stems:
        record = json.loads((out / f"{s}.json").read_text())
        record.pop("seconds", None)
        record["image"] = Path(record["image"]).name
        got[s] = (record, (out / f"{s}.png").read_bytes(), (out / f"{s}_overlay.jpg").read_bytes())
    return got


# ------------------------------------------------------------------ oversized, broken and linked inputs


def test_oversized_images_are_skipped_with_a_reason_and_the_run_goes_on(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    names = make_photos(tmp_path / "in", 2)
    png_header_only(tmp_path / "in" / "bomb.png", 30000, 30000)  # Pillow's decompression-bomb error
    png_header_only(tmp_path / "in" / "huge.png", 9400, 9400)  # under Pillow's limit, over AutoSeg's default
    assert (tmp_path / "in" / "bomb.png").stat().st_size < 1_000_000
    assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    status = {e["output"]: e for e in manifest["inputs"]}
    assert manifest["complete"] is True
    assert all(status[n]["status"] == "ok" and prediction_complete(tmp_path / "out", n) is not None for n in names)
    assert status["bomb"]["status"] == "error" and "too large" in status["bomb"]["reason"]
    assert "9400 x 9400" in status["huge"]["reason"] and "--max-pixels" in status["huge"]["reason"]
    # the limit is the user's to set
    with pytest.raises(ValueError, match="more than the limit of 1,000"):
        load_image(tmp_path / "in" / "p0.png", max_pixels=1000)


def test_dangling_symlink_is_reported_not_dropped(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    make_photos(tmp_path / "in", 1)
    (tmp_path / "in" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 1
    status = {e["output"]: e for e in json.loads((tmp_path / "out" / "manifest.json").read_text())["inputs"]}
    assert "broken symbolic link" in status["gone"]["reason"] and "nowhere.jpg" in status["gone"]["reason"]


# ------------------------------------------------------------------ paths that escape the output folder


def test_split_ids_cannot_escape_the_predictions_folder(tmp_path):
    from test_datasets import make_voc

    make_voc(tmp_path)
    split = tmp_path / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        split.write_text(f"2007_000033\n{bad}\n")
        with pytest.raises(ValueError, match=r"val.txt, line 2: image id .* without '\.\.'"):
            build_dataset("voc21", tmp_path)


def test_presets_are_names_not_paths():
    from autoseg.config import load_config

    for bad in ("../../configs/debug/pipeline", "../presets/demo", "/etc/passwd"):
        with pytest.raises(ValueError, match=r"unknown preset .*available: \[.*'demo'"):
            load_config(preset=bad)
    assert load_config(preset="demo").scales


def test_write_prediction_refuses_names_outside_its_folder(tmp_path):
    pred = outputs.Prediction(["cat"], np.ones((4, 4), np.int32))
    image = Image.new("RGB", (4, 4))
    for bad in ("../x", str(tmp_path / "abs")):
        with pytest.raises(ValueError, match="relative name"):
            outputs.write_prediction(tmp_path / "out", bad, image, "x.png", pred)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "abs.png").exists()


# ------------------------------------------------------------------ complete-or-absent sets and resuming


def test_skip_existing_redoes_incomplete_sets_and_keeps_vocabularies(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    names = make_photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 0
    full = snapshot(out, names)
    (out / "p1_overlay.jpg").unlink()  # what a kill between the JSON and the overlay used to leave
    kept = (out / "p0.png").stat().st_mtime_ns
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    assert snapshot(out, names) == full
    assert (out / "p0.png").stat().st_mtime_ns == kept
    status = {e["output"]: e for e in json.loads((out / "manifest.json").read_text())["inputs"]}
    assert status["p0"]["skipped"] and not status["p1"].get("skipped")
    assert all(status[n]["vocabulary"] == full[n][0]["vocabulary"] for n in names)


def test_second_run_into_a_busy_folder_is_refused(tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys):
    make_photos(tmp_path / "in", 1)
    with RunManifest(tmp_path / "out"):
        assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 2
    err = capsys.readouterr().err
    assert "in use by another AutoSeg run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "p0.json").exists()
    assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 0  # lock released


def test_runs_into_one_folder_merge_their_manifests(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    make_photos(tmp_path / "a", 2)
    photo(tmp_path / "b.png", 30, 30, 9)
    assert infer(tmp_path / "a", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 0
    assert infer(tmp_path / "b.png", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(e["output"] for e in manifest["inputs"]) == ["b", "p0", "p1"]


def test_status_lines_survive_a_torn_last_line(tmp_path):
    lines = tmp_path / "manifest.jsonl"
    lines.write_text('{"output": "a", "status": "ok"}\n{"output": "b", "sta')
    with RunManifest(tmp_path) as run:
        entry = {"input": "c.png", "output": "c", "status": "ok"}
        run.start([entry])
        run.record(entry)
    assert set(read_status_lines(tmp_path)) == {"a", "c"}


# ------------------------------------------------------------------ output folders that cannot be written


def test_unusable_output_folder_is_a_usage_error_before_models_load(
    tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys, monkeypatch
):
    def no_loading(config):
        raise AssertionError("models loaded before the output folder was checked")

    monkeypatch.setattr("autoseg.api.build_pipeline", no_loading)
    make_photos(tmp_path / "in", 1)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 2
        err = capsys.readouterr().err
        assert "output folder" in err and len(err.strip().splitlines()) == 1


def test_full_disk_stops_the_run_and_leaves_only_complete_sets(tmp_path, tiny_blip_dir, tiny_clipseg_dir, monkeypatch):
    names = make_photos(tmp_path / "in", 4)
    out = tmp_path / "out"
    real, calls = outputs.files.save_image_atomic, []

    def fill_up(path, image, **kw):
        calls.append(path)
        if len(calls) == 4:  # second image's overlay: its label map is already on disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, image, **kw)

    monkeypatch.setattr(outputs.files, "save_image_atomic", fill_up)
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "4") == 1
    assert prediction_complete(out, "p0") is not None
    for n in names[1:]:  # nothing half-written stays behind
        assert not any(out.glob(f"{n}*")), sorted(p.name for p in out.iterdir())
    assert not list(out.glob(".*.tmp*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and "No space left" in manifest["inputs"][1]["reason"]
    monkeypatch.setattr(outputs.files, "save_image_atomic", real)
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    assert all(prediction_complete(out, n) is not None for n in names)


def test_outputs_honour_the_umask(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    make_photos(tmp_path / "in", 1)
    old = os.umask(0o027)
    try:
        assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 0
    finally:
        os.umask(old)
    for f in ("p0.png", "p0.json", "p0_overlay.jpg", "manifest.json"):
        assert (tmp_path / "out" / f).stat().st_mode & 0o777 == 0o640, f


def test_eval_usage_errors_exit_2_before_work(tmp_path, capsys):
    from test_eval import make_dataset

    make_dataset(tmp_path / "ds", ["cat", "dog"])
    (tmp_path / "file").write_text("x")
    base = ["--dataset", "folder", "--root", str(tmp_path / "ds"), "--mapper", "exact", "--no-progress"]
    cases = [
        ["--report", str(tmp_path / "r.json"), "--batch-size", "0"],
        ["--report", str(tmp_path / "r.json"), "--save-predictions", str(tmp_path / "file")],
        ["--report", str(tmp_path / "file" / "r.json"), "--predictions", str(tmp_path)],
        ["--report", str(tmp_path / "r.json"), "--max-pixels", "0"],
        # an unusable TensorBoard folder is found before any scoring (not after)
        ["--report", str(tmp_path / "r.json"), "--predictions", str(tmp_path), "--tensorboard", str(tmp_path / "file")],
    ]
    for extra in cases:
        assert eval_main(base + extra) == 2, extra
        assert "eval.py: error: " in capsys.readouterr().err


# ------------------------------------------------------------------ SIGKILL at many points, then resume


def crash_run(kill_at: int, tool: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / "crash_run.py"), str(kill_at), tool, *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def kill_then_resume(tool: str, argv: list[str], kill_points: list[int]) -> None:
    """Run ``argv`` SIGKILLed at each kill point in turn, each run resuming the last, then once to the end."""
    for k in kill_points:
        died = crash_run(k, tool, argv)
        assert died.returncode == -9, (k, died.stdout[-500:], died.stderr[-2000:])  # it really died at step k
    done = crash_run(0, tool, argv)
    assert done.returncode == 0, done.stderr[-2000:]


def kill_points(tool: str, argv: list[str], chain: list[int] | None) -> list[list[int]]:
    """``[chain]``, or with None one single kill per step of a whole run (the steps counted by a run of its own)."""
    if chain is not None:
        return [chain]
    counted = crash_run(0, tool, argv)
    total = int(counted.stdout.strip().splitlines()[-1].split(": ")[1])
    return [[k] for k in range(1, total + 1)]


def assert_all_complete(out: Path, names: list[str]) -> None:
    for n in names:
        vocabulary = prediction_complete(out, n)
        assert vocabulary is not None, n
        with Image.open(out / f"{n}.png") as im:
            assert np.asarray(im).max() <= len(vocabulary)
        with Image.open(out / f"{n}_overlay.jpg") as im:
            im.load()
    assert not list(out.rglob(".*.tmp*"))


# default: one chain of kills, each run resuming the last; slow: a kill at every step of a run, each on its own
@pytest.mark.parametrize("chain", [[1, 5, 3, 2], pytest.param(None, marks=pytest.mark.slow)])
def test_infer_killed_at_many_points_resumes_to_the_uninterrupted_result(
    tmp_path, tiny_blip_dir, tiny_clipseg_dir, chain
):
    names = make_photos(tmp_path / "in", 5)
    assert infer(tmp_path / "in", tmp_path / "ref", tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "2") == 0
    ref = snapshot(tmp_path / "ref", names)

    def argv(out: Path) -> list[str]:
        args = [str(tmp_path / "in"), "-o", str(out), "--config", DEBUG_CONFIG, "--blip", str(tiny_blip_dir)]
        return args + ["--segmenter", str(tiny_clipseg_dir), "--seed", "3", "--batch-size", "2", "--skip-existing"]

    for i, points in enumerate(kill_points("infer", argv(tmp_path / "count"), chain)):
        out = tmp_path / f"out{i}"
        kill_then_resume("infer", argv(out), points)
        assert_all_complete(out, names)
        assert snapshot(out, names) == ref, points
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and [e["output"] for e in manifest["inputs"]] == names
        assert all(
            e["status"] == "ok" and e["vocabulary"] == ref[e["output"]][0]["vocabulary"] for e in manifest["inputs"]
        )


@pytest.mark.parametrize("chain", [[2, 4], pytest.param(None, marks=pytest.mark.slow)])
def test_eval_killed_at_many_points_resumes_to_the_uninterrupted_report(
    tmp_path, tiny_blip_dir, tiny_clipseg_dir, chain
):
    from test_eval import SIZES, make_dataset

    make_dataset(tmp_path / "ds", ["dog", "cat", "sky"])
    base = ["--dataset", "folder", "--root", str(tmp_path / "ds"), "--mapper", "exact", "--no-progress"]
    base += ["--config", DEBUG_CONFIG, "--blip", str(tiny_blip_dir), "--segmenter", str(tiny_clipseg_dir)]
    base += ["--seed", "1", "--batch-size", "1"]
    assert eval_main([*base, "--report", str(tmp_path / "ref" / "report.json")]) == 0
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    ref.pop("predictions")

    def argv(folder: Path) -> list[str]:
        return [*base, "--report", str(folder / "report.json"), "--skip-existing"]

    for i, points in enumerate(kill_points("eval", argv(tmp_path / "count"), chain)):
        kill_then_resume("eval", argv(tmp_path / f"run{i}"), points)
        assert_all_complete(tmp_path / f"run{i}" / "report_predictions", list(SIZES))
        got = json.loads((tmp_path / f"run{i}" / "report.json").read_text())
        got.pop("predictions")
        assert got == ref, points


@pytest.mark.slow
def test_real_sigkill_on_timers_then_resume(tmp_path):
    """``kill -9`` of real ``infer.py`` processes (demo preset, ShapesWorld images) after growing delays, resuming."""
    import signal

    from autoseg.data.shapes import ShapesConfig, generate_sample

    (tmp_path / "in").mkdir()
    for i in range(24):
        image, _, _ = generate_sample(5, i, ShapesConfig(size=96))
        image.save(tmp_path / "in" / f"s{i:02d}.png")
    names = [f"s{i:02d}" for i in range(24)]
    cmd = [sys.executable, str(ROOT / "infer.py"), str(tmp_path / "in"), "--preset", "demo", "--batch-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    assert subprocess.run([*cmd, "-o", str(tmp_path / "ref")], env=env, capture_output=True).returncode == 0
    out, kills = tmp_path / "out", 0
    for delay in (3.0, 4.0, 5.0, 6.0, 7.0, 8.0):
        proc = subprocess.Popen(
            [*cmd, "-o", str(out), "--skip-existing"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills >= 3  # most runs were killed part-way
    final = subprocess.run([*cmd, "-o", str(out), "--skip-existing"], env=env, capture_output=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_all_complete(out, names)
    assert snapshot(out, names) == snapshot(tmp_path / "ref", names)


# ------------------------------------------------------------------ file names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_processed_with_the_others(tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys):
    names = make_photos(tmp_path / "in", 2)
    bad = os.fsencode(tmp_path / "in") + b"/bad\xff.png"  # Linux names are bytes; Python decodes this one to '\udcff'
    photo(Path(os.fsdecode(bad)), 30, 30, 7)
    out = tmp_path / "out"
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 0, capsys.readouterr().err
    for suffix in (b".png", b".json", b"_overlay.jpg"):
        assert os.path.isfile(os.fsencode(out) + b"/bad\xff" + suffix)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))  # still valid UTF-8 JSON
    status = {e["output"]: e for e in manifest["inputs"]}
    assert status["bad\udcff"]["status"] == "ok" and os.fsencode(status["bad\udcff"]["input"]) == bad
    assert all(status[n]["status"] == "ok" for n in names) and manifest["complete"]
    record = json.loads((Path(os.fsdecode(os.fsencode(out) + b"/bad\xff.json"))).read_text(encoding="utf-8"))
    assert os.fsencode(record["image"]) == bad
    # the names read back equal to the files': a resumed run finds every set complete
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    again = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["inputs"]
    assert len(again) == 3 and all(e.get("skipped") for e in again)
