"""Outputs never touch inputs: infer.py and eval.py refuse an output folder that is, is inside (or, for infer.py,
holds) an input folder or a dataset, before anything is written."""

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.cli.eval import main as eval_main
from autoseg.cli.infer import main as infer_main


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def folder_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("sky\ngrass\n")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 2, (16, 16), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def test_infer_refuses_an_output_folder_that_is_or_is_inside_the_input_folder(tmp_path, capsys):
    images = folder_dataset(tmp_path / "ds") / "images"
    before = digest(images)
    for out in (images, images / "out", images.parent):  # the same folder, inside it, around it
        assert infer_main([str(images), "-o", str(out), "--preset", "demo"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("infer.py: error: output folder") and "choose a folder apart from the inputs" in err
        assert err.count("\n") == 1
    assert digest(images) == before and not (images / "out").exists()
    one = images / "0.png"
    assert infer_main([str(one), "-o", str(images), "--preset", "demo"]) == 2  # 0.png would be overwritten
    assert "holds input file" in capsys.readouterr().err and digest(images) == before


def test_eval_refuses_to_write_predictions_or_reports_into_the_dataset(tmp_path, capsys):
    root = folder_dataset(tmp_path / "ds")
    before = digest(root)
    argv = ["--dataset", "folder", "--root", str(root), "--preset", "demo", "--mapper", "exact"]
    assert eval_main([*argv, "--save-predictions", str(root / "masks"), "--report", str(tmp_path / "r.json")]) == 2
    assert "predictions folder" in capsys.readouterr().err
    assert eval_main([*argv, "--report", str(root / "report.json")]) == 2
    assert "report folder" in capsys.readouterr().err
    assert digest(root) == before  # the ground truth is untouched
