"""``benchmarks/bench_augment.py``: both pipelines produce the same batches (the benchmark refuses to time unequal
work) and the report has its figures."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_augment  # noqa: E402


def test_pipelines_give_equal_batches_and_the_report_has_its_figures(tmp_path):
    out = tmp_path / "augment.json"
    assert bench_augment.main(["--n", "12", "--batch", "4", "--size", "64", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["items"] == 12 and report["byte_equal_batches"] is True
    assert set(report["ms_per_item"]) == {"torchvision_v2", "autoseg"} and report["speedup"] > 0


def test_a_pipeline_that_differs_is_refused(monkeypatch):
    ours = bench_augment.ours

    def shifted(size, scale):
        item, collate = ours(size, scale)
        return (lambda it: {**item(it), "mask": item(it)["mask"] + 1}), collate

    monkeypatch.setattr(bench_augment, "ours", shifted)
    with pytest.raises(AssertionError, match="mask batches differ"):
        bench_augment.main(["--n", "4", "--batch", "4", "--size", "32", "--repeats", "1"])
