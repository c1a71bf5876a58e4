"""The on-disk prediction format written by ``infer.py`` and read by ``eval.py``.

For an image ``IMG`` (relative stem, sub-folders kept) a prediction folder holds:

- ``IMG.png``: single-channel label map at the image's size; 0 = unlabelled, i = i-th name of the vocabulary.
- ``IMG.json``: ``{"image": path, "vocabulary": [names, label 1 first], "pixel_fraction": {name: fraction}, ...}``.
- ``IMG_overlay.jpg``: colours and a name legend, for people.

The JSON is written last: an image's set counts as written only once its JSON exists (see :func:`write_prediction`).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from autoseg.utils.io import atomic_write_json, remove_stale_temporaries, safe_relative, save_image_atomic

UNLABELLED = 0


@dataclass
class Prediction:
    """One image's auto-vocabulary segmentation.

    Attributes:
        vocabulary: names; label ``i`` (1-based) in ``label_map`` is ``vocabulary[i - 1]``.
        label_map: ``H x W`` integer map at the input image's size, 0 = unlabelled.
        cluster_map: ``h x w`` BBoost cluster map on the patch grid (None when not computed).
        captions: per cluster id, the captions generated for it.
        extra: anything else worth saving in the JSON (timings, settings).
        image: the RGB image it describes (for :meth:`overlay`; not saved).
    """

    vocabulary: list[str]
    label_map: np.ndarray
    cluster_map: np.ndarray | None = None
    captions: dict[int, list[str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    def pixel_fraction(self) -> dict[str, float]:
        """Each name's share of the pixels, and the unlabelled share under ``"<unlabelled>"``."""
        counts = np.bincount(self.label_map.ravel().astype(np.int64), minlength=len(self.vocabulary) + 1)
        total = max(int(counts.sum()), 1)
        out = {name: float(counts[i + 1]) / total for i, name in enumerate(self.vocabulary)}
        out["<unlabelled>"] = float(counts[UNLABELLED]) / total
        return out

    def mask(self, name: str) -> np.ndarray:
        """``H x W`` boolean mask of the pixels labelled ``name``.

        Raises:
            KeyError: ``name`` is not in the vocabulary (the message lists it).
        """
        if name not in self.vocabulary:
            raise KeyError(f"{name!r} is not in this prediction's vocabulary {self.vocabulary}")
        return self.label_map == self.vocabulary.index(name) + 1

    def overlay(self, image: Image.Image | None = None, alpha: float = 0.5) -> Image.Image:
        """The image with label colours and a legend of the names (what ``IMG_overlay.jpg`` shows).

        Args:
            image: the image to draw on (default: the one this prediction was made from).
        """
        image = image if image is not None else self.image
        if image is None:
            raise ValueError("this prediction holds no image; pass the image: prediction.overlay(image)")
        return render_overlay(image, self.label_map, self.vocabulary, alpha)

    def record(self, image_path: str | None = None) -> dict[str, Any]:
        """The JSON record ``infer.py`` writes as ``IMG.json`` (without the ``files`` entry)."""
        h, w = self.label_map.shape
        return {
            "image": str(image_path) if image_path is not None else None,
            "size": [w, h],
            "vocabulary": list(self.vocabulary),
            "pixel_fraction": self.pixel_fraction(),
            "captions": {str(k): v for k, v in self.captions.items()},
            **self.extra,
        }

    def to_json(self, image_path: str | None = None, indent: int | None = None) -> str:
        """:meth:`record` as a JSON string."""
        return json.dumps(self.record(image_path), indent=indent)


def palette(n: int, seed: int = 7) -> np.ndarray:
    """``n x 3`` uint8 colours; index 0 (unlabelled) is black, the rest are bright and distinct."""
    rng = np.random.default_rng(seed)
    cols = np.zeros((max(n, 1), 3), dtype=np.uint8)
    golden = 0.618033988749895
    for i in range(1, n):
        h = (i * golden) % 1.0
        s, v = 0.65 + 0.35 * rng.random(), 0.85 + 0.15 * rng.random()
        cols[i] = np.array(_hsv_to_rgb(h, s, v)) * 255
    return cols


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def render_overlay(image: Image.Image, label_map: np.ndarray, vocabulary: list[str], alpha: float = 0.5) -> Image.Image:
    """Blend label colours over the image and add a legend strip with each present name."""
    cols = palette(len(vocabulary) + 1)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colour = cols[label_map].astype(np.float32)
    labelled = (label_map != UNLABELLED)[..., None]
    blended = np.where(labelled, (1 - alpha) * rgb + alpha * colour, rgb).astype(np.uint8)
    out = Image.fromarray(blended)
    present = [i for i in np.unique(label_map) if i != UNLABELLED]
    if not present:
        return out
    font = ImageFont.load_default()
    row = 14
    legend = Image.new("RGB", (out.width, row * len(present) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for r, i in enumerate(present):
        y = 2 + r * row
        draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(c) for c in cols[i]))
        draw.text((20, y), vocabulary[i - 1], fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (out.width, out.height + legend.height), (255, 255, 255))
    canvas.paste(out, (0, 0))
    canvas.paste(legend, (0, out.height))
    return canvas


# Top-level names the run's bookkeeping uses (manifest.json beside the sets, see autoseg.outputs.manifest): an image
# of that stem gets one more "~" (as does one whose name is such a name followed by "~"s, which keeps names distinct).
RESERVED_STEMS = ("manifest",)


def output_base(out_dir: str | Path, stem: str | Path, what: str = "output name") -> Path:
    """The path the files of output ``stem`` are named after (an image's set or a clip's, see
    :func:`prediction_files`): ``out_dir / stem``, with one more ``~`` for a reserved top-level name.

    Raises:
        ValueError: ``stem`` is absolute or leaves ``out_dir``.
    """
    rel = safe_relative(stem, what)
    if len(rel.parts) == 1 and rel.name.rstrip("~").lower() in RESERVED_STEMS:
        rel = rel.with_name(rel.name + "~")
    return Path(out_dir) / rel


def prediction_files(out_dir: str | Path, stem: str | Path) -> dict[str, Path]:
    """The files of one prediction set: ``label_map`` (PNG), ``overlay`` (JPEG) and ``record`` (JSON, written last).

    They are ``STEM.png``, ``STEM_overlay.jpg`` and ``STEM.json``, except that a top-level stem that is a reserved name
    (:data:`RESERVED_STEMS`, any case) followed by zero or more ``~`` gets one more ``~``: image ``manifest`` is
    written as ``manifest~.json`` (the run's ``manifest.json`` stays its own), ``manifest~`` as ``manifest~~.json``;
    no two stems share a file. Writers and readers both name files here.
    """
    base = output_base(out_dir, stem)
    return {
        "label_map": base.with_name(base.name + ".png"),
        "overlay": base.with_name(base.name + "_overlay.jpg"),
        "record": base.with_name(base.name + ".json"),
    }


def write_prediction(
    out_dir: str | Path, stem: str | Path, image: Image.Image, image_path: str, pred: Prediction
) -> dict:
    """Write ``stem.png``, ``stem_overlay.jpg`` and then ``stem.json`` under ``out_dir``: a set is committed together.

    Each file is written atomically, and the JSON record (which names the other two) is written last and removed
    first: a set whose JSON exists is complete; a kill or a write error part-way leaves no JSON, and an error removes
    what this call wrote. :func:`prediction_complete` checks a set.

    Returns:
        the JSON record written.

    Raises:
        ValueError: the label map does not fit the image or a PNG.
        OSError: a file could not be written (nothing of the set is left behind).
    """
    files = prediction_files(out_dir, stem)
    _refuse_linked_folders(out_dir, files["record"])
    if pred.label_map.shape != (image.height, image.width):
        raise ValueError(f"label map {pred.label_map.shape} does not match image {(image.height, image.width)}")
    n = len(pred.vocabulary)
    if n > 65535:
        raise ValueError(f"vocabulary of {n} names does not fit a 16-bit PNG")
    mode, dtype = ("L", np.uint8) if n <= 255 else ("I;16", np.uint16)
    record = {
        **pred.record(image_path),
        "files": {"label_map": files["label_map"].name, "overlay": files["overlay"].name},
    }
    overlay = render_overlay(image, pred.label_map, pred.vocabulary)
    remove_prediction(out_dir, stem)  # an older or half-written set goes first, its JSON before its parts
    try:
        save_image_atomic(files["label_map"], Image.fromarray(pred.label_map.astype(dtype), mode=mode))
        save_image_atomic(files["overlay"], overlay, quality=90)
        atomic_write_json(files["record"], record)
    except BaseException:
        remove_prediction(out_dir, stem)
        raise
    return record


def remove_prediction(out_dir: str | Path, stem: str | Path) -> None:
    """Delete the files of prediction ``stem`` and the temporaries of a killed write (the JSON first).

    Raises:
        OSError: a sub-folder of ``out_dir`` on the way is a symbolic link (nothing is deleted through it).
    """
    files = prediction_files(out_dir, stem)
    _refuse_linked_folders(out_dir, files["record"])
    for f in reversed(files.values()):
        f.unlink(missing_ok=True)
        remove_stale_temporaries(f)


def _refuse_linked_folders(out_dir: str | Path, file: Path) -> None:
    """Refuse to write or delete ``file`` through a sub-folder of ``out_dir`` that is a symbolic link.

    A set's own files are never followed (each is replaced or unlinked as a link), but a linked sub-folder would put
    them, and the removal of an older set, into the folder it points to.

    Raises:
        OSError: ``ELOOP``, naming the link.
    """
    folder = Path(out_dir)
    for part in file.relative_to(folder).parts[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise OSError(
                errno.ELOOP,
                f"{folder} is a symbolic link inside the output folder; outputs are never written through one",
            )


def prediction_complete(out_dir: str | Path, stem: str | Path) -> list[str] | None:
    """The vocabulary of a complete prediction set ``stem``, or None when the set is absent or incomplete.

    Complete: the JSON record parses and has a vocabulary, and the label map (whose PNG header must give the recorded
    size) and the overlay exist. Checks headers only, so resuming over 100,000 images stays cheap.
    """
    files = prediction_files(out_dir, stem)
    try:
        record = json.loads(files["record"].read_text(encoding="utf-8"))
        vocabulary, size = record["vocabulary"], record["size"]
        if not files["overlay"].is_file() or files["overlay"].stat().st_size == 0:
            return None
        with Image.open(files["label_map"]) as im:
            if list(im.size) != list(size):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return vocabulary if isinstance(vocabulary, list) else None


def read_vocabulary_record(js: Path) -> list[str]:
    """The ``vocabulary`` list of a prediction's JSON record.

    Raises:
        ValueError: the JSON is malformed or its vocabulary is not a list of names (the message names the file).
    """
    try:
        vocabulary = json.loads(js.read_text(encoding="utf-8"))["vocabulary"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{js}: expected a JSON object with a 'vocabulary' list ({e})") from e
    if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary):
        raise ValueError(f"{js}: 'vocabulary' must be a list of names")
    return vocabulary


def read_prediction(
    pred_dir: str | Path, stem: str | Path, vocabulary: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Read back ``(label_map, vocabulary)`` written by :func:`write_prediction`.

    ``vocabulary``, when the caller has already read it from the JSON (:func:`read_vocabulary_record`), is not read
    again.

    Raises:
        FileNotFoundError: the PNG or the JSON is missing (the message names it).
        ValueError: the JSON is malformed or the label map uses labels beyond the vocabulary.
    """
    files = prediction_files(pred_dir, stem)
    png, js = files["label_map"], files["record"]
    for f in (png, js):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: prediction file missing (expected infer.py output IMG.png + IMG.json)")
    vocabulary = read_vocabulary_record(js) if vocabulary is None else vocabulary
    with Image.open(png) as im:
        label_map = np.asarray(im).astype(np.int64)
    if label_map.ndim != 2:
        raise ValueError(f"{png}: expected a single-channel label map, got shape {label_map.shape}")
    if label_map.max(initial=0) > len(vocabulary):
        raise ValueError(f"{png}: label {label_map.max()} exceeds the vocabulary of {len(vocabulary)} names in {js}")
    return label_map, list(vocabulary)
