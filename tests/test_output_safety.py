"""The output folder's own files: planted symbolic links are never followed, the lock goes away after a run.

Each test reproduces a defect of the output-folder issue (it failed before the fix).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_reliability import infer, make_photos, photo

from autoseg.outputs import OutputBusyError, RunManifest, prediction_complete


def victims(folder: Path, names) -> dict[Path, bytes]:
    """A file per name outside the output folder, with known content."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in names:
        (folder / n).write_bytes(f"victim {n}\n".encode())
        out[folder / n] = (folder / n).read_bytes()
    return out


def unchanged(files: dict[Path, bytes]) -> bool:
    return all(f.read_bytes() == content for f, content in files.items())


def one_run(out: Path, rank: int = 0) -> None:
    with RunManifest(out, {"config": {}}, rank=rank) as run:
        entry = {"input": "a.png", "output": "a", "status": "pending"}
        run.start([entry])
        entry["status"] = "ok"
        run.record(entry)
        run.finish()


# ------------------------------------------------------------------ planted symbolic links


@pytest.mark.parametrize("name", [".autoseg.lock", "manifest.jsonl", "manifest.rank1.jsonl"])
def test_a_linked_lock_or_status_file_is_refused_and_its_target_untouched(tmp_path, name):
    kept = victims(tmp_path / "elsewhere", ["target"])
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(tmp_path / "elsewhere" / "target")
    with pytest.raises(ValueError) as err:
        one_run(out, rank=1 if "rank" in name else 0)
    msg = str(err.value)
    assert str(out / name) in msg and "symbolic link" in msg and "\n" not in msg, msg
    assert unchanged(kept)
    (out / name).unlink()
    one_run(out)  # nothing was left locked
    assert unchanged(kept)


def test_a_dangling_linked_lock_creates_nothing_at_its_target(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".autoseg.lock").symlink_to(tmp_path / "planted")
    with pytest.raises(ValueError, match="symbolic link"):
        one_run(out)
    assert not (tmp_path / "planted").exists()


def test_a_hard_linked_lock_is_refused_and_not_truncated(tmp_path):
    kept = victims(tmp_path / "elsewhere", ["target"])
    out = tmp_path / "out"
    out.mkdir()
    os.link(tmp_path / "elsewhere" / "target", out / ".autoseg.lock")
    with pytest.raises(ValueError, match=r"\.autoseg\.lock: .*link"):
        one_run(out)
    assert unchanged(kept)


def test_a_linked_manifest_is_replaced_not_written_through(tmp_path):
    kept = victims(tmp_path / "elsewhere", ["target"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").symlink_to(tmp_path / "elsewhere" / "target")
    one_run(out)
    assert unchanged(kept) and not (out / "manifest.json").is_symlink()
    assert json.loads((out / "manifest.json").read_text())["inputs"][0]["output"] == "a"


def test_infer_replaces_planted_output_links_and_leaves_their_targets_alone(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    make_photos(tmp_path / "in", 2)
    planted = ["p0.png", "p0.json", "p0_overlay.jpg", "manifest.json"]
    kept = victims(tmp_path / "elsewhere", planted)
    out = tmp_path / "out"
    out.mkdir()
    for n in planted:
        (out / n).symlink_to(tmp_path / "elsewhere" / n)
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 0
    assert unchanged(kept)
    assert not any((out / n).is_symlink() for n in planted)
    assert prediction_complete(out, "p0") is not None and prediction_complete(out, "p1") is not None


def test_infer_into_a_folder_with_a_linked_lock_is_a_one_line_usage_error(
    tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys
):
    make_photos(tmp_path / "in", 1)
    kept = victims(tmp_path / "elsewhere", ["target"])
    out = tmp_path / "out"
    out.mkdir()
    (out / ".autoseg.lock").symlink_to(tmp_path / "elsewhere" / "target")
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("infer.py: error: ") and ".autoseg.lock" in err[-1] and "symbolic link" in err[-1]
    assert unchanged(kept) and not (out / "p0.json").exists()


def test_outputs_are_not_written_through_a_linked_sub_folder(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    photo(tmp_path / "in" / "top.png", 30, 30, 1)
    photo(tmp_path / "in" / "sub" / "x.png", 30, 30, 2)
    kept = victims(tmp_path / "elsewhere", ["x.png", "x.json"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(tmp_path / "elsewhere")
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir) == 1  # that image fails, the other is done
    assert unchanged(kept) and sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["x.json", "x.png"]
    status = {e["output"]: e for e in json.loads((out / "manifest.json").read_text())["inputs"]}
    assert status["top"]["status"] == "ok"
    assert status["sub/x"]["status"] == "error" and "symbolic link" in status["sub/x"]["reason"]
    assert str(out / "sub") in status["sub/x"]["reason"]


# ------------------------------------------------------------------ the lock after a run


def test_a_finished_run_leaves_no_lock_file(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    make_photos(tmp_path / "in", 1)
    assert infer(tmp_path / "in", tmp_path / "out", tiny_blip_dir, tiny_clipseg_dir) == 0
    assert not (tmp_path / "out" / ".autoseg.lock").exists()
    one_run(tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["manifest.json", "manifest.jsonl"]


def test_the_lock_still_refuses_a_second_run_while_the_first_is_open(tmp_path):
    with RunManifest(tmp_path) as first:
        first.start([])
        with pytest.raises(OutputBusyError, match=f"in use by another AutoSeg run \\(pid {os.getpid()}\\)"):
            RunManifest(tmp_path).__enter__()
        assert (tmp_path / ".autoseg.lock").exists()
    assert not (tmp_path / ".autoseg.lock").exists()
    with RunManifest(tmp_path):  # free again
        pass


def test_a_lock_file_removed_by_a_finishing_run_does_not_let_two_runs_in(tmp_path):
    """A run that opened the old lock file just before the holder removed it must not lock that orphan file."""
    import fcntl

    from autoseg.outputs import manifest

    real_flock, runs = fcntl.flock, []

    def flock_after_the_holder_left(fd, op):
        if not runs:  # the holder finishes between this run's open and its flock
            runs.append(first)
            first.__exit__(None, None, None)
            second.__enter__()  # a third run now creates and locks a new lock file
            runs.append(second)
        return real_flock(fd, op)

    first, second = RunManifest(tmp_path), RunManifest(tmp_path)
    first.__enter__()
    late = RunManifest(tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest.fcntl, "flock", flock_after_the_holder_left)
        with pytest.raises(OutputBusyError):
            late.__enter__()
    second.__exit__(None, None, None)


def test_a_killed_runs_lock_file_does_not_block_the_next_run(tmp_path):
    (tmp_path / ".autoseg.lock").write_text("12345")  # what a SIGKILLed run leaves: the file, but no lock
    one_run(tmp_path)
    assert not (tmp_path / ".autoseg.lock").exists()


# ------------------------------------------------------------------ an input named like the run's own files


def test_reserved_stems_are_escaped_injectively_at_the_top_level_only(tmp_path):
    from autoseg.outputs import prediction_files

    def names(stem):
        return [p.relative_to(tmp_path).as_posix() for p in prediction_files(tmp_path, stem).values()]

    assert names("manifest") == ["manifest~.png", "manifest~_overlay.jpg", "manifest~.json"]
    assert names("manifest~") == ["manifest~~.png", "manifest~~_overlay.jpg", "manifest~~.json"]
    assert names("Manifest")[2] == "Manifest~.json"  # manifest.json on a case-insensitive file system
    for plain in ("sub/manifest", "manifests", "manifest.rank1", "a~", "~", "my_manifest"):
        assert names(plain)[2] == f"{plain}.json"
    stems = ["manifest", "manifest~", "manifest~~", "Manifest", "MANIFEST~", "manifests", "a", "a~", "sub/manifest"]
    files = [f for s in stems for f in names(s)]
    assert len(set(files)) == len(files)  # no two stems share a file
    own = {RunManifest.LOCK, RunManifest.LINES, RunManifest.MANIFEST, "manifest.rank1.jsonl"}
    assert not own & set(files)


def test_an_input_named_manifest_keeps_its_own_files_and_the_run_manifest(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    (tmp_path / "in").mkdir()
    photo(tmp_path / "in" / "manifest.png", 30, 30, 1)
    photo(tmp_path / "in" / "a.png", 30, 30, 2)
    out = tmp_path / "out"
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    assert prediction_complete(out, "manifest") is not None
    assert (out / "manifest~.json").is_file()
    assert infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, "--skip-existing") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "config" in manifest and manifest["complete"]
    status = {e["output"]: e for e in manifest["inputs"]}
    assert sorted(status) == ["a", "manifest"] and all(e.get("skipped") for e in status.values())


def test_eval_scores_a_dataset_image_named_manifest(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    import numpy as np
    from PIL import Image

    from autoseg.cli.eval import main as eval_main

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("dog\ncat\n")
    for name in ("manifest", "b"):
        photo(root / "images" / f"{name}.png", 24, 20, 3)
        Image.fromarray(np.ones((20, 24), np.uint8)).save(root / "masks" / f"{name}.png")
    report = tmp_path / "r" / "report.json"
    argv = ["--dataset", "folder", "--root", str(root), "--mapper", "exact", "--no-progress", "--report", str(report)]
    argv += ["--config", str(Path(__file__).parents[1] / "configs/debug/pipeline.yaml"), "--blip", str(tiny_blip_dir)]
    assert eval_main([*argv, "--segmenter", str(tiny_clipseg_dir)]) == 0
    got = json.loads(report.read_text())
    assert got["n_images"] == 2 and got["missing_predictions"] == []
