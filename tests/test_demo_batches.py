"""The shipped demo preset gives every image the same outputs whatever shares its batch: ``--batch-size 1`` and
``--batch-size 5`` write the same bytes, and a run killed between two images of a batch, then resumed with
``--skip-existing`` (its batches shifted), equals an uninterrupted run."""

import json
from pathlib import Path

import pytest
from test_reliability import crash_run

from autoseg.cli.infer import main as infer_main
from autoseg.data.shapes import generate_sample, sample_name

RECORD_TIMING = ("seconds",)  # the only field allowed to differ: each run's own time per image


def shapes_images(folder: Path, seed: int, n: int) -> list[str]:
    folder.mkdir(parents=True)
    for i in range(n):
        generate_sample(seed, i)[0].save(folder / f"{sample_name(i)}.png")
    return [sample_name(i) for i in range(n)]


def written(out: Path, names: list[str]) -> dict[str, tuple]:
    """Per image: the label map's and the overlay's bytes, and the JSON record without its timing."""
    result = {}
    for n in names:
        record = json.loads((out / f"{n}.json").read_text())
        record = {k: v for k, v in record.items() if k not in RECORD_TIMING}
        result[n] = ((out / f"{n}.png").read_bytes(), (out / f"{n}_overlay.jpg").read_bytes(), record)
    return result


@pytest.mark.parametrize("seed", [7, 424242])
def test_batch_size_does_not_change_the_demo_outputs(seed, tmp_path):
    names = shapes_images(tmp_path / "in", seed, 7)
    runs = {}
    for size in (1, 5):
        out = tmp_path / f"b{size}"
        assert infer_main([str(tmp_path / "in"), "-o", str(out), "--preset", "demo", "--batch-size", str(size)]) == 0
        runs[size] = written(out, names)
    assert runs[1] == runs[5]


def test_a_kill_between_two_images_of_a_batch_then_resume_equals_an_uninterrupted_run(tmp_path):
    names = shapes_images(tmp_path / "in", 11, 13)
    argv = ["--preset", "demo", "--batch-size", "5", "--skip-existing"]
    assert infer_main([str(tmp_path / "in"), "-o", str(tmp_path / "ref"), *argv]) == 0
    out = tmp_path / "out"
    # steps: manifest.json at the start, then per image 3 file commits and its status line: step 6 dies while the
    # second image of the first batch is being written, after the first one is complete
    died = crash_run(6, "infer", [str(tmp_path / "in"), "-o", str(out), *argv])
    assert died.returncode == -9, died.stderr[-2000:]
    assert (out / f"{names[0]}.json").is_file() and not (out / f"{names[1]}.json").is_file()
    done = crash_run(0, "infer", [str(tmp_path / "in"), "-o", str(out), *argv])  # batches now start at image 2
    assert done.returncode == 0, done.stderr[-2000:]
    assert written(out, names) == written(tmp_path / "ref", names)
