"""The demo page's functions, called without a browser: the backend (settings, vocabulary edits, re-segmenting with the
segmenter alone, the files infer.py writes, bad uploads), the page's handlers, and the command line's usage errors.

The shipped demo preset (small, real, offline) is the pipeline; one test runs the tiny random models of conftest."""

import dataclasses
import json
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from autoseg.app import backend as app_backend
from autoseg.app.backend import (
    MAX_NAMES,
    DemoBackend,
    Settings,
    cluster_annotations,
    cluster_labels,
    cluster_rows,
    colours,
    display_size,
    edit_vocabulary,
    highlight,
    label_annotations,
    name_rows,
    resize_labels,
    safe_stem,
    sample_images,
)
from autoseg.config import ConfigError, load_config
from autoseg.outputs import Prediction, palette, read_prediction

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "shapes" / "images" / "000002.png"


@pytest.fixture(autouse=True)
def temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """Gradio's cache of shown files (read per component) and the backend's temporary folders go under tmp_path."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``(config, pipeline)`` of the demo preset, loaded once."""
    from autoseg.api import build_pipeline

    config = load_config(preset="demo")
    return config, build_pipeline(config)


@pytest.fixture
def backend(demo, tmp_path):
    config, pipeline = demo
    b = DemoBackend(pipeline, config, out_root=tmp_path / "requests")
    yield b
    b.close()


@pytest.fixture
def result(backend):
    """The demo's analysis of a sample (a fresh object per test; the vocabulary stage is cached per backend)."""
    return backend.analyse(backend.load(SAMPLE), SAMPLE.name, backend.defaults)


# ---------------------------------------------------------------------------------------------------- pure helpers
def test_edit_vocabulary_remove_add_rename():
    vocab = ["grass", "sky", "cross"]
    assert edit_vocabulary(vocab, "remove", "sky") == ["grass", "cross"]
    assert edit_vocabulary(vocab, "add", new_name="  red   star ") == ["grass", "sky", "cross", "red star"]
    assert edit_vocabulary(vocab, "rename", "cross", "plus sign") == ["grass", "sky", "plus sign"]
    assert edit_vocabulary(vocab, "rename", "sky", "sky") == vocab  # renaming to itself is allowed
    assert vocab == ["grass", "sky", "cross"]  # the input is not changed
    assert edit_vocabulary(["sky"], "remove", "sky") == []


@pytest.mark.parametrize(
    ("action", "name", "new_name", "message"),
    [
        ("remove", "", "", "choose a name to remove"),
        ("rename", None, "x", "choose a name to rename"),
        ("remove", "tree", "", "'tree' is not in the vocabulary"),
        ("add", "", "   ", "type a new name to add"),
        ("add", "", "sky", "'sky' is already in the vocabulary"),
        ("rename", "grass", "sky", "'sky' is already in the vocabulary"),
        ("add", "", "x" * 61, "keep it to 60 or fewer"),
        ("shuffle", "", "", "unknown vocabulary edit 'shuffle'"),
    ],
)
def test_edit_vocabulary_errors_say_what_to_do(action, name, new_name, message):
    with pytest.raises(ValueError, match=message):
        edit_vocabulary(["grass", "sky"], action, name, new_name)


def test_edit_vocabulary_caps_the_number_of_names():
    full = [f"n{i}" for i in range(MAX_NAMES)]
    with pytest.raises(ValueError, match=f"already has {MAX_NAMES} names"):
        edit_vocabulary(full, "add", new_name="one more")


def test_settings_parse_apply_and_vocabulary_key():
    config = load_config(preset="demo")
    s = Settings.parse(3.0, 2, 5.0, 2, 0.25)
    assert s == Settings(3, 2, 5, 2, 0.25)
    new = s.apply(config)
    assert (new.seed, new.bboost.k_min, new.bboost.k_max, new.caption.n_passes) == (3, 2, 5, 2)
    assert new.segmenter.threshold == 0.25
    assert config.seed == 0 and config.bboost.k_min == 12  # the shared config is not changed
    assert Settings.from_config(config) == Settings(0, 12, 12, 8, 0.0)
    assert s.vocabulary_key() == Settings(3, 2, 5, 2, 0.9).vocabulary_key()  # the threshold is the segmenter's
    with pytest.raises(ValueError, match="'k min' must be a whole number, got 2.5"):
        Settings.parse(0, 2.5, 5, 2, 0)
    with pytest.raises(ValueError, match="'seed' is empty"):
        Settings.parse(None, 2, 5, 2, 0)
    with pytest.raises(
        ConfigError, match=r"page settings: bboost.k_max: expected an integer in \[k_min \(5\), 64\], got 2"
    ):
        Settings(0, 5, 2, 2, 0.0).apply(config)
    with pytest.raises(ConfigError, match="segmenter.threshold"):
        Settings(0, 2, 5, 2, 1.5).apply(config)


def test_samples_come_from_the_repo_or_are_regenerated_identically(tmp_path, monkeypatch):
    repo = sample_images()
    assert [p.name for p in repo] == [f"{i:06d}.png" for i in range(6)]
    monkeypatch.setattr(app_backend, "REPO_SAMPLES", tmp_path / "no-checkout")  # as in a wheel install
    made = sample_images()
    assert [p.name for p in made] == [p.name for p in repo]
    for a, b in zip(repo, made, strict=True):
        assert np.array_equal(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b).convert("RGB")))
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        sample_images(tmp_path / "mine")
    Image.new("RGB", (8, 8)).save(tmp_path / "mine" / "a.jpg")
    assert sample_images(tmp_path / "mine") == [tmp_path / "mine" / "a.jpg"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        sample_images(tmp_path / "missing")


def test_display_helpers():
    labels = np.array([[0, 1], [2, 2]])
    assert resize_labels(labels, (4, 2)).tolist() == [[0, 0, 1, 1], [2, 2, 2, 2]]
    assert display_size(Image.new("RGB", (3000, 1000))) == (1024, 341)
    assert display_size(Image.new("RGB", (100, 50))) == (100, 50)
    cols = palette(3)
    assert colours(["a", "b"]) == {n: "#{:02x}{:02x}{:02x}".format(*cols[i + 1]) for i, n in enumerate("ab")}
    assert safe_stem("My photo (1).JPG") == "My_photo_1" and safe_stem("../..png") == "image"


# ---------------------------------------------------------------------------------------------------- the backend
def test_analyse_shows_names_clusters_and_writes_infer_files(backend, result):
    pred = result.prediction
    assert pred.vocabulary, "the demo names nothing in a sample"
    assert pred.vocabulary == result.found.vocabulary
    assert pred.label_map.shape == (128, 128) and pred.label_map.max() <= len(pred.vocabulary)
    rows = name_rows(pred)
    shown = [n for i, n in enumerate(pred.vocabulary, 1) if (pred.label_map == i).any()]
    assert [r[0] for r in rows if r[0] != "(unlabelled)"] == shown  # the table lists what the legend shows
    assert sum(r[1] for r in rows) == pytest.approx(100, abs=0.5)
    image, masks = label_annotations(result)
    assert image.shape == (128, 128, 3)
    assert {name for _, name in masks} == {n for i, n in enumerate(pred.vocabulary, 1) if (pred.label_map == i).any()}
    for mask, name in masks:
        assert np.array_equal(mask > 0, pred.label_map == pred.vocabulary.index(name) + 1)
    table = cluster_rows(result)
    assert len(table) == len(result.found.captions) > 1
    assert sum(r[1] for r in table) == pytest.approx(100, abs=0.5)
    for k, _, nouns, captions in table:
        assert captions == " | ".join(result.found.captions[k])
        assert nouns == ", ".join(result.found.extra["cluster_nouns"][str(k)])
    _, cmasks, ccolours = cluster_annotations(result)
    assert len(cmasks) == len(table) and set(ccolours) == {label for _, label in cmasks}
    named = colours(pred.vocabulary)
    for k, label in enumerate(cluster_labels(result)):  # one colour per name in every view
        nouns = result.found.extra["cluster_nouns"][str(k)]
        first = next((n for n in pred.vocabulary if n in nouns), None)
        if label in ccolours:
            assert ccolours[label] == (named[first] if first else app_backend.UNNAMED_COLOUR)

    png, record, overlay = result.files
    assert (png.name, record.name, overlay.name) == ("000002.png", "000002.json", "000002_overlay.jpg")
    assert png.parent.parent == backend.out_root
    label_map, vocabulary = read_prediction(png.parent, "000002")
    assert vocabulary == pred.vocabulary and np.array_equal(label_map, pred.label_map)
    data = json.loads(record.read_text())
    assert data["image"] == "000002.png" and data["cluster_nouns"] == result.found.extra["cluster_nouns"]
    assert Image.open(overlay).size[0] == 128


def test_resegment_runs_the_segmenter_alone(backend, result, monkeypatch):
    def no_captioning(self, images):
        raise AssertionError("re-segmenting must not recaption")

    monkeypatch.setattr(type(backend.pipeline), "vocabulary", no_captioning)
    removed = result.prediction.vocabulary[0]
    vocab = [*result.prediction.vocabulary[1:], "pebble"]
    out = backend.resegment(result, vocab)
    assert out.prediction.vocabulary == vocab and out.prediction.label_map.max() <= len(vocab)
    assert out.prediction.captions == result.found.captions and out.found is result.found
    assert out.files[0].parent != result.files[0].parent  # every request writes its own folder
    data = json.loads(out.files[1].read_text())
    assert data["vocabulary"] == vocab and removed in data["found_vocabulary"]
    # the names kept cover what they covered before, and the removed name's pixels went to the others
    assert (out.prediction.label_map > 0).all() and result.prediction.label_map.shape == out.prediction.label_map.shape
    empty = backend.resegment(result, [])
    assert not empty.prediction.label_map.any() and name_rows(empty.prediction) == [["(unlabelled)", 100.0]]


def test_threshold_is_per_request_and_the_shared_segmenter_is_untouched(demo, backend, result):
    _, pipeline = demo
    before = pipeline.segmenter.threshold
    strict = backend.resegment(result, result.prediction.vocabulary, threshold=0.99999)
    assert pipeline.segmenter.threshold == before
    assert strict.settings.threshold == 0.99999
    assert (strict.prediction.label_map == 0).sum() >= (result.prediction.label_map == 0).sum()
    assert (strict.prediction.label_map == 0).any()  # the demo segmenter is not that sure everywhere
    relaxed = backend.resegment(strict, strict.prediction.vocabulary, threshold=0.0)
    assert np.array_equal(relaxed.prediction.label_map, result.prediction.label_map)


def test_concurrent_requests_do_not_see_each_others_settings(backend, result):
    vocab = result.prediction.vocabulary
    reference = {t: backend.resegment(result, vocab, threshold=t).prediction.label_map for t in (0.0, 0.9)}
    found, errors = {}, []

    def work(i, t):
        try:
            found[i] = (t, backend.resegment(result, vocab, threshold=t).prediction.label_map)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, (0.0, 0.9)[i % 2])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(np.array_equal(labels, reference[t]) for t, labels in found.values())


def test_vocabulary_stage_is_cached_per_image_and_settings(backend, monkeypatch):
    calls = []
    real = type(backend.pipeline).vocabulary

    def counting(self, images, seed=None, **settings):
        calls.append(seed)
        return real(self, images, seed=seed, **settings)

    monkeypatch.setattr(type(backend.pipeline), "vocabulary", counting)
    image = backend.load(SAMPLE)
    a = backend.analyse(image, "a.png", backend.defaults)
    b = backend.analyse(image.copy(), "b.png", dataclasses.replace(backend.defaults, threshold=0.5))  # same content
    assert len(calls) == 1 and b.found is a.found and b.settings.threshold == 0.5
    c = backend.analyse(image, "a.png", dataclasses.replace(backend.defaults, seed=7))
    assert calls == [0, 7] and c.settings.seed == 7


def test_bad_uploads_get_a_clear_message(backend, tmp_path):
    text = tmp_path / "upload123" / "notes.txt"
    text.parent.mkdir()
    text.write_text("not an image")
    with pytest.raises(app_backend.ImageReadError, match="notes.txt: not a readable image") as e:
        backend.load(text)
    assert str(tmp_path) not in str(e.value)  # the server's temporary path is not shown
    truncated = tmp_path / "half.png"
    truncated.write_bytes(SAMPLE.read_bytes()[:300])
    with pytest.raises(app_backend.ImageReadError, match="half.png"):
        backend.load(truncated)
    backend.max_pixels = 128 * 128 - 1
    with pytest.raises(app_backend.ImageReadError, match=r"more than the limit of 16,383 \(raise it with --max-pixels"):
        backend.load(SAMPLE, "big.png")


def test_any_pipeline_works_tiny_random_models(tiny_blip_dir, tiny_clipseg_dir, tmp_path):
    from autoseg.api import build_pipeline
    from autoseg.data.shapes import ShapesConfig, generate_sample

    overrides = {"blip": str(tiny_blip_dir), "segmenter": {"source": str(tiny_clipseg_dir)}}
    config = load_config(REPO / "configs" / "debug" / "pipeline.yaml", overrides)
    b = DemoBackend(build_pipeline(config), config)
    try:
        image = generate_sample(0, 1, ShapesConfig(size=64))[0]
        result = b.analyse(image, "tiny.png", Settings(1, 2, 3, 1, 0.0))
        assert result.found.cluster_map is not None and len(cluster_rows(result)) >= 1
        out = b.resegment(result, ["dog", "cat"])
        assert set(np.unique(out.prediction.label_map)) <= {0, 1, 2} and all(f.is_file() for f in out.files)
        assert highlight(out, "cat").shape == (64, 64, 3) and highlight(out, "tree") is None
    finally:
        b.close()
    assert b.out_root.parent == tmp_path and not b.out_root.exists()


# ---------------------------------------------------------------------------------------------------- the page
@pytest.fixture
def handlers(backend):
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    from autoseg.app.page import Handlers

    return Handlers(backend, sample_images())


def test_handlers_upload_run_pick_and_edit(handlers):
    from autoseg.app.page import describe_names

    chosen, preview, status, *cleared = handlers.choose_upload(str(SAMPLE))
    assert chosen[1] == "000002.png" and preview.size == (128, 128) and "Press Segment" in status
    assert cleared[0] is None and len(cleared) == 8
    out = handlers.run(chosen, 0, 6, 6, 3, 0.0)
    result, segmentation, names, choice, selected, clusters, table, files, status = out
    vocab = result.prediction.vocabulary
    assert status.startswith(f"000002.png: {describe_names(result.prediction)}")
    shown = [r[0] for r in names if r[0] != "(unlabelled)"]
    assert segmentation.color_map == colours(vocab) and shown == [n for n in vocab if n in shown]
    assert choice.choices == [(n, n) for n in vocab] and selected is None
    assert len(table) == len(result.found.captions) and [Path(f).suffix for f in files] == [".png", ".json", ".jpg"]

    legend_click = SimpleNamespace(value=vocab[0], index=0, row_value=None)
    assert handlers.pick(result, legend_click) == vocab[0]
    row_click = SimpleNamespace(value=12.5, index=[0, 1], row_value=[vocab[-1], 12.5])
    assert handlers.pick(result, row_click) == vocab[-1]
    view = handlers.select_view(result, vocab[0])
    assert view.shape == (128, 128, 3)

    out = handlers.edit("remove", result, vocab[0], "", 0.0)
    assert out[0].prediction.vocabulary == vocab[1:] and out[-1] == ""
    assert out[-2].startswith(f"Removed '{vocab[0]}'; re-segmented without recaptioning")
    out = handlers.edit("rename", out[0], vocab[1], "  big  thing ", 0.0)
    assert "big thing" in out[0].prediction.vocabulary and f"Renamed '{vocab[1]}' to 'big thing'" in out[-2]
    out = handlers.edit("add", out[0], None, "pebble", 0.2)
    assert out[0].prediction.vocabulary[-1] == "pebble" and out[0].settings.threshold == 0.2
    out = handlers.edit("resegment", out[0], None, "", 0.5)
    assert out[0].settings.threshold == 0.5 and out[-2].startswith("Threshold 0.5; re-segmented without recaptioning")
    out = handlers.edit("reset", out[0], None, "", 0.0)
    assert out[0].prediction.vocabulary == vocab and out[-2].startswith("Back to the names found")


def test_handlers_report_problems_in_the_status_box(handlers, tmp_path, monkeypatch):
    import gradio as gr

    def skipped(values):
        return all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1 for v in values)

    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    chosen, preview, status, *cleared = handlers.choose_upload(str(bad))
    assert chosen is None and preview is None and status.startswith("Cannot use this file: notes.txt")
    assert cleared[0] is None and cleared[1] is None and cleared[2] == []  # no result of another image beside it
    out = handlers.run(None, 0, 6, 6, 3, 0.0)
    assert skipped(out[:-1]) and out[-1] == "Upload an image or pick a sample first."
    image_choice = handlers.choose_upload(str(SAMPLE))[0]
    out = handlers.run(image_choice, 0, 7, 6, 3, 0.0)
    assert skipped(out[:-1]) and "bboost.k_max: expected an integer in [k_min (7), 64], got 6" in out[-1]
    out = handlers.edit("remove", None, "sky", "", 0.0)
    assert skipped(out[:-2]) and skipped(out[-1:]) and out[-2].startswith("Segment an image first")
    result = handlers.run(image_choice, 0, 6, 6, 3, 0.0)[0]
    out = handlers.edit("remove", result, "tree", "", 0.0)
    assert "'tree' is not in the vocabulary" in out[-2]
    assert handlers.pick(None, SimpleNamespace(value="sky", row_value=None)) == gr.skip()

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(handlers.backend, "analyse", boom)
        out = handlers.run(image_choice, 0, 6, 6, 3, 0.0)
    assert out[-1].startswith("Segmentation failed (RuntimeError: out of memory)") and "Traceback" not in out[-1]
    assert handlers.run(image_choice, 0, 6, 6, 3, 0.0)[0] is not None  # the next request works


def test_a_refused_upload_or_a_new_sample_clears_the_results_and_uploads_leave_no_file(handlers, tmp_path):
    from gradio.utils import get_upload_folder

    upload = Path(get_upload_folder()) / "abc123" / "photo.png"
    upload.parent.mkdir(parents=True)
    upload.write_bytes(SAMPLE.read_bytes())
    chosen, preview, status, result, *views = handlers.choose_upload(str(upload))
    assert chosen[1] == "photo.png" and not upload.exists()  # read into memory, the server's copy removed
    segmented = handlers.run(chosen, 0, 6, 6, 3, 0.0)
    assert segmented[0] is not None
    bad = Path(get_upload_folder()) / "def456" / "bad.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a png")
    chosen, preview, status, result, segmentation, names, *_ = handlers.choose_upload(str(bad))
    assert chosen is None and result is None and segmentation is None and names == []
    assert status.startswith("Cannot use this file: bad.png") and not bad.exists()
    picked = handlers.choose_sample(SimpleNamespace(index=0))
    assert picked[0] is not None and picked[3] is None and picked[-1] is None  # the upload box is emptied
    kept = handlers.samples[0]
    assert kept.exists()  # a sample is never removed


def test_legend_table_and_status_agree_with_the_label_map(backend, result):
    from autoseg.app.page import describe_names

    vocab = ["sky", "boat", "grass", "kite"]
    label_map = np.zeros((4, 4), np.int32)
    label_map[:2], label_map[2:] = 1, 3  # boat and kite label no pixel
    pred = Prediction(vocab, label_map)
    assert app_backend.present_names(pred) == ["sky", "grass"]
    assert name_rows(pred) == [["sky", 50.0], ["grass", 50.0]]
    assert describe_names(pred) == "4 names found, 2 label pixels: sky, grass (no pixels: boat, kite)"
    tiny = np.zeros((100, 100), np.int32)
    tiny[0, 0] = 1
    assert name_rows(Prediction(["dot"], tiny)) == [["dot", 0.01], ["(unlabelled)", 100.0]]  # never a false 0


def test_upload_limit_follows_the_pixel_limit_and_sessions_release_their_memory(backend, result, tmp_path):
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    from autoseg.app.page import SESSION_SECONDS, build_page
    from autoseg.cli.app import build_parser, upload_limit

    assert upload_limit(16_000_000) == 4 * 16_000_000 + 2**20
    assert upload_limit(16_000_000, 2.5) == int(2.5 * 2**20)
    with pytest.raises(ValueError, match="--max-upload-mb must be a positive number"):
        upload_limit(100, float("nan"))
    assert build_parser().parse_args([]).max_pixels == app_backend.PAGE_MAX_PIXELS
    page = build_page(backend, sample_images())
    states = [b for b in page.blocks.values() if type(b).__name__ == "State"]
    assert len(states) == 4 and all(s.time_to_live == SESSION_SECONDS for s in states)  # an image's two, a clip's two
    folder = result.files[0].parent
    assert folder.is_dir()
    [s for s in states if s.delete_callback is not None and s.delete_callback.__name__ == "release"][0].delete_callback(
        result
    )
    assert not folder.exists()  # a session's downloads go with it
    found = next(iter(backend._cache.values()))
    assert found.image is None  # the vocabulary cache keeps no image


def test_page_builds_with_queued_model_events(backend):
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    from autoseg.app.page import build_page

    page = build_page(backend, sample_images(), source="`--preset demo`")
    ids = {b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)}
    assert {"upload", "samples", "run", "status", "segmentation", "names", "name", "remove", "clusters"} <= ids
    assert {"downloads", "new-name", "rename", "add", "resegment", "reset", "selected", "cluster-table"} <= ids
    model_events = [f for f in page.fns.values() if f.concurrency_id == "models"]
    assert len(model_events) == 7 and all(f.concurrency_limit == 1 for f in model_events)  # 6 for images, 1 for clips
    assert page.analytics_enabled is False


def test_command_line_usage_errors_exit_2_before_models_load(tmp_path, capsys):
    from autoseg.cli.app import describe_source, main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such file or folder, and not a preset" in capsys.readouterr().err
    assert main(["--preset", "nope"]) == 2
    assert "unknown preset 'nope'; available: ['demo']" in capsys.readouterr().err
    assert main(["--max-pixels", "0"]) == 2
    assert "--max-pixels must be a positive number" in capsys.readouterr().err
    assert main(["--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    assert main(["--samples", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    args = SimpleNamespace(preset="demo", config=None, blip=None, segmenter="x/seg", enhancer=None)
    assert describe_source(args) == "`--preset demo --segmenter x/seg`"
