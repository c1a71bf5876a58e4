"""``infer.py --devices 2`` on CPU (Lightning DDP over gloo): the same files as one process, and kill -9 + resume.

DDP re-executes the command line for its second process, so these tests run ``infer.py`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import DEBUG_CONFIG, ROOT, assert_all_complete, make_photos, snapshot


def run_infer(inputs: Path, out: Path, blip, seg, *extra: str, wait: bool = True):
    cmd = [sys.executable, str(ROOT / "infer.py"), str(inputs), "-o", str(out), "--config", DEBUG_CONFIG]
    cmd += ["--blip", str(blip), "--segmenter", str(seg), "--seed", "3", "--device", "cpu", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    if not wait:  # its own process group, so that a kill reaches every rank as a job scheduler's would
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def test_two_processes_write_the_same_files_as_one(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    names = make_photos(tmp_path / "in", 5)
    one = run_infer(tmp_path / "in", tmp_path / "one", tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_infer(
        tmp_path / "in", tmp_path / "two", tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "2", "--devices", "2"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert snapshot(tmp_path / "two", names) == snapshot(tmp_path / "one", names)
    assert (tmp_path / "two" / "manifest.rank1.jsonl").is_file()  # the second process really wrote some
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and [e["output"] for e in manifest["inputs"]] == names
    assert all(e["status"] == "ok" and e["vocabulary"] for e in manifest["inputs"])


@pytest.mark.slow
def test_two_processes_killed_part_way_resume_with_skip_existing(tmp_path, tiny_blip_dir, tiny_clipseg_dir):
    names = make_photos(tmp_path / "in", 16)
    ref = run_infer(tmp_path / "in", tmp_path / "ref", tiny_blip_dir, tiny_clipseg_dir, "--batch-size", "1")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "out"
    args = ("--batch-size", "1", "--devices", "2", "--skip-existing")
    proc = run_infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, *args, wait=False)
    for _ in range(6000):  # until the first image is committed (bounded: 10 minutes at most)
        if any(out.glob("p*.json")) or proc.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -9
    done = [n for n in names if (out / f"{n}.json").exists()]
    assert 0 < len(done) < len(names)  # killed part-way
    again = run_infer(tmp_path / "in", out, tiny_blip_dir, tiny_clipseg_dir, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_all_complete(out, names)
    assert snapshot(out, names) == snapshot(tmp_path / "ref", names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and sorted(e["output"] for e in manifest["inputs"]) == sorted(names)
    assert sum(bool(e.get("skipped")) for e in manifest["inputs"]) == len(done)
