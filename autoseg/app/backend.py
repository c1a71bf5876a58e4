"""What the demo page does, without the page: read an upload, run the pipeline with the page's settings, edit the
vocabulary and re-segment, and write the files ``infer.py`` writes. Gradio-free, so tests call it directly.

The page uses the public pipeline API only: ``pipeline.vocabulary(images, seed=, bboost=, caption=)`` (clusters,
captions, nouns) and ``pipeline.segment(images, vocabularies, threshold=)``; a request's settings are arguments of
those calls, so no request changes what another one sees. A vocabulary edit runs the segmenter alone.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from autoseg.config import PipelineConfig, validate_config
from autoseg.outputs import Prediction, palette, prediction_files, write_prediction
from autoseg.utils.io import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageReadError, load_image

# data/samples/shapes/shapesworld.json: the bundled samples are ShapesWorld seed 90001, samples 0..5 (128 px)
REPO_SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples" / "shapes" / "images"
SAMPLES_SEED, SAMPLES_COUNT = 90001, 6
MAX_NAMES = 64
MAX_NAME_CHARS = 60
MAX_DISPLAY_SIDE = 1024  # the page shows larger images downscaled; the files keep the full size
PAGE_MAX_PIXELS = 16_000_000  # the page's default pixel limit (a 4,000 x 4,000 photo); infer.py's is 64,000,000
MASK_ALPHA = 0.6
UNLABELLED_ROW = "(unlabelled)"
UNNAMED_COLOUR = "#9e9e9e"  # clusters whose nouns are not in the vocabulary


@dataclass(frozen=True)
class Settings:
    """The settings a person touches on the page; the rest comes from the pipeline config.

    Attributes:
        seed: seed of k-means and caption sampling.
        k_min: fewest BBoost clusters tried.
        k_max: most BBoost clusters tried.
        n_passes: sampled captions per cluster.
        threshold: segmenter score below which a pixel stays unlabelled (0: every pixel gets a name).
    """

    seed: int
    k_min: int
    k_max: int
    n_passes: int
    threshold: float

    @classmethod
    def from_config(cls, config: PipelineConfig) -> Settings:
        return cls(
            config.seed, config.bboost.k_min, config.bboost.k_max, config.caption.n_passes, config.segmenter.threshold
        )

    @classmethod
    def parse(cls, seed, k_min, k_max, n_passes, threshold) -> Settings:
        """Settings from the page's number fields (floats from sliders; None from an emptied box).

        Raises:
            ValueError: a box is empty or a count is not a whole number (the message names the setting).
        """

        def whole(value, what: str) -> int:
            if value is None or value == "":
                raise ValueError(f"setting '{what}' is empty; enter a whole number")
            if float(value) != int(float(value)):
                raise ValueError(f"setting '{what}' must be a whole number, got {value}")
            return int(float(value))

        if threshold is None or threshold == "":
            raise ValueError("setting 'segmenter threshold' is empty; enter a number in [0, 1]")
        return cls(
            whole(seed, "seed"),
            whole(k_min, "k min"),
            whole(k_max, "k max"),
            whole(n_passes, "caption passes"),
            float(threshold),
        )

    def apply(self, config: PipelineConfig) -> PipelineConfig:
        """``config`` with these settings, checked.

        Raises:
            autoseg.config.ConfigError: a setting is out of range; the message names it and what is allowed.
        """
        new = dataclasses.replace(
            config,
            seed=self.seed,
            bboost=dataclasses.replace(config.bboost, k_min=self.k_min, k_max=self.k_max),
            caption=dataclasses.replace(config.caption, n_passes=self.n_passes),
            segmenter=dataclasses.replace(config.segmenter, threshold=self.threshold),
        )
        validate_config(new, "page settings")
        return new

    def vocabulary_key(self) -> tuple:
        """What the vocabulary stage depends on (the threshold only matters to the segmenter)."""
        return self.seed, self.k_min, self.k_max, self.n_passes


@dataclass
class PageResult:
    """One analysed image: what the page shows and what vocabulary edits start from.

    Attributes:
        image: the RGB input.
        name: the uploaded file's name; downloads are named after its stem.
        found: the vocabulary stage (names found by captioning, cluster map, captions; no label map). Never mutated.
        prediction: the current segmentation (vocabulary possibly edited, label map at the image's size).
        settings: the settings it was made with.
        files: the download files ``[label PNG, JSON, overlay JPEG]``.
    """

    image: Image.Image
    name: str
    found: Prediction
    prediction: Prediction
    settings: Settings
    files: list[Path] = field(default_factory=list)


def edit_vocabulary(vocabulary: Sequence[str], action: str, name: str = "", new_name: str = "") -> list[str]:
    """The vocabulary after one edit: ``remove`` or ``rename`` ``name``; ``add`` ``new_name`` at the end.

    Raises:
        ValueError: no name chosen, ``name`` not in the vocabulary, an empty, too long or duplicate new name, or
            too many names; the message says what to do.
    """
    vocab = list(vocabulary)
    if action in ("remove", "rename") and not name:
        raise ValueError(f"choose a name to {action} first (click it in the legend or the list)")
    if action in ("remove", "rename") and name not in vocab:
        raise ValueError(f"'{name}' is not in the vocabulary {vocab}")
    if action == "remove":
        return [n for n in vocab if n != name]
    if action not in ("add", "rename"):
        raise ValueError(f"unknown vocabulary edit {action!r}; expected one of ['remove', 'add', 'rename']")
    new = " ".join(str(new_name).split())
    if not new:
        raise ValueError(f"type a new name to {action} first")
    if len(new) > MAX_NAME_CHARS:
        raise ValueError(f"new name has {len(new)} characters; keep it to {MAX_NAME_CHARS} or fewer")
    if new in vocab and not (action == "rename" and new == name):
        raise ValueError(f"'{new}' is already in the vocabulary")
    if action == "rename":
        return [new if n == name else n for n in vocab]
    if len(vocab) >= MAX_NAMES:
        raise ValueError(f"the vocabulary already has {len(vocab)} names, the most the page takes")
    return [*vocab, new]


def safe_stem(name: str) -> str:
    """A file stem for downloads made from an uploaded file's name (letters, digits, ``._-`` only)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    return stem[:80] or "image"


def sample_images(folder: str | Path | None = None) -> list[Path]:
    """The sample images offered on the page.

    Args:
        folder: a folder of images; None: the bundled ShapesWorld samples, i.e. ``data/samples/shapes/images`` of a
            source checkout (an editable install), or else the same images regenerated from their recorded seed
            into a temporary folder (a wheel install ships no sample files).

    Raises:
        FileNotFoundError: ``folder`` is not a folder or has no images.
    """
    if folder is None:
        found = sorted(p for p in REPO_SAMPLES.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if found:
            return found
        from autoseg.data.shapes import generate_sample, sample_name

        out = Path(tempfile.mkdtemp(prefix="autoseg_samples_"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        for i in range(SAMPLES_COUNT):
            generate_sample(SAMPLES_SEED, i)[0].save(out / f"{sample_name(i)}.png")
        return sorted(out.glob("*.png"))
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--samples {folder}: not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise FileNotFoundError(f"--samples {folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return found


class DemoBackend:
    """The loaded pipeline and what the page asks of it.

    Args:
        pipeline: an ``AutoSegPipeline`` (built once with :func:`autoseg.load`; shared by all requests).
        config: the settings the page starts from (default: the pipeline's own).
        max_pixels: largest upload accepted, in pixels (``load_image``'s limit).
        out_root: folder for the per-request download folders (None: a temporary folder removed by :meth:`close`).
        cache_size: vocabulary-stage results kept, keyed by image content and settings (captioning is the slow part).
        keep_files_s: per-request download folders older than this are removed.
    """

    def __init__(
        self,
        pipeline,
        config: PipelineConfig | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        out_root: str | Path | None = None,
        cache_size: int = 32,
        keep_files_s: float = 3600.0,
    ):
        self.pipeline = pipeline
        self.config = config if config is not None else pipeline.config
        self.max_pixels = max_pixels
        self.defaults = Settings.from_config(self.config)
        self.has_threshold = pipeline.takes_threshold  # semantic modes; instance backends (Grounded-SAM) have none
        self._own_root = out_root is None
        self.out_root = Path(tempfile.mkdtemp(prefix="autoseg_app_")) if out_root is None else Path(out_root)
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.keep_files_s = keep_files_s
        self._cache: OrderedDict[tuple, Prediction] = OrderedDict()
        self._cache_size = cache_size
        self.lock = threading.Lock()  # the models serve one request at a time (clips too); the cache is shared

    def close(self) -> None:
        """Remove the download folders (when this backend made their root)."""
        if self._own_root:
            shutil.rmtree(self.out_root, ignore_errors=True)

    def load(self, path: str | Path, name: str | None = None) -> Image.Image:
        """Read an uploaded file as RGB.

        Raises:
            ImageReadError: not an image, unreadable, or over ``max_pixels``; the message names ``name`` (the file's
                name as the person knows it) instead of the server's temporary path.
        """
        name = name or Path(path).name
        try:
            return load_image(path, self.max_pixels)
        except ImageReadError as e:
            raise ImageReadError(str(e).replace(str(path), name)) from None

    def analyse(self, image: Image.Image, name: str, settings: Settings) -> PageResult:
        """Cluster, caption and segment one image (the vocabulary stage is reused from the cache when it can)."""
        config = settings.apply(self.config)
        key = (image_digest(image), settings.vocabulary_key())
        with self.lock:
            found = self._cache.get(key)
            if found is None:
                t0 = time.perf_counter()
                found = self.pipeline.vocabulary(
                    [image], seed=config.seed, bboost=config.bboost, caption=config.caption
                )[0]
                found.image = None  # the cache keeps names, captions and the small cluster map, never the image
                found.extra["seconds_vocabulary"] = round(time.perf_counter() - t0, 3)
                self._cache[key] = found
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        result = PageResult(image, name, found, found, settings)
        return self.resegment(result, found.vocabulary)

    def resegment(self, result: PageResult, vocabulary: Sequence[str], threshold: float | None = None) -> PageResult:
        """Segment ``result``'s image with ``vocabulary`` (the segmenter alone: no clustering, no captions).

        Args:
            threshold: the segmenter threshold to use (None: the one ``result`` was made with).
        """
        settings = result.settings if threshold is None else dataclasses.replace(result.settings, threshold=threshold)
        settings.apply(self.config)  # checks the threshold
        vocabulary = list(vocabulary)
        with self.lock:
            t0 = time.perf_counter()
            threshold = settings.threshold if self.has_threshold else None
            label_map = self.pipeline.segment([result.image], [vocabulary], threshold=threshold)[0].label_map
            seconds = time.perf_counter() - t0
        found = result.found
        extra = {**found.extra, "seconds_segmenter": round(seconds, 3), "settings": dataclasses.asdict(settings)}
        if vocabulary != found.vocabulary:
            extra["found_vocabulary"] = list(found.vocabulary)
        pred = Prediction(
            vocabulary=vocabulary,
            label_map=label_map,
            cluster_map=found.cluster_map,
            captions=found.captions,
            extra=extra,
        )
        out = dataclasses.replace(result, prediction=pred, settings=settings)
        out.files = self.write_files(out)
        return out

    def release(self, result) -> None:
        """Forget a finished session's result (a :class:`PageResult`, a clip's upload or result of :mod:`.clips`, or
        None): its request folder is removed (its memory goes with the session)."""
        for folder in {f.parent for f in (result.files if result is not None else [])}:
            if folder.parent == self.out_root:
                shutil.rmtree(folder, ignore_errors=True)

    def write_files(self, result: PageResult) -> list[Path]:
        """Write the label PNG, the JSON and the overlay (as ``infer.py`` does) into a new per-request folder."""
        folder = self.request_folder()
        stem = safe_stem(result.name)
        write_prediction(folder, stem, result.image, result.name, result.prediction)
        files = prediction_files(folder, stem)
        return [files["label_map"], files["record"], files["overlay"]]

    def request_folder(self) -> Path:
        """A new, empty per-request folder (removed by :meth:`release`, after ``keep_files_s``, or by :meth:`close`)."""
        self._prune()
        return Path(tempfile.mkdtemp(prefix="request_", dir=self.out_root))

    def _prune(self) -> None:
        cutoff = time.time() - self.keep_files_s
        for d in self.out_root.glob("request_*"):
            try:
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass


def image_digest(image: Image.Image) -> str:
    """A key for an image's content."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- what is shown
def colours(vocabulary: Sequence[str]) -> dict[str, str]:
    """Each name's colour as ``#rrggbb``, the same as in the overlay file."""
    cols = palette(len(vocabulary) + 1)
    return {n: "#{:02x}{:02x}{:02x}".format(*cols[i + 1]) for i, n in enumerate(vocabulary)}


def display_size(image: Image.Image, max_side: int = MAX_DISPLAY_SIDE) -> tuple[int, int]:
    """``(width, height)`` at which the page shows ``image``."""
    scale = min(1.0, max_side / max(image.width, image.height))
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A label map resized (nearest) to ``(width, height)``."""
    h, w = labels.shape
    rows = (np.arange(size[1]) * h) // size[1]
    cols = (np.arange(size[0]) * w) // size[0]
    return labels[rows[:, None], cols[None, :]]


def label_annotations(result: PageResult) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """``(H x W x 3 image, [(H x W mask, name)])`` of the names present, at display size."""
    size = display_size(result.image)
    image = np.asarray(result.image.resize(size, Image.Resampling.BILINEAR))
    labels = resize_labels(result.prediction.label_map, size)
    masks = []
    for i, name in enumerate(result.prediction.vocabulary, start=1):
        mask = labels == i
        if mask.any():
            masks.append((mask.astype(np.float32) * MASK_ALPHA, name))
    return image, masks


def cluster_labels(result: PageResult) -> list[str]:
    """One legend label per cluster: ``"k: nouns"``."""
    nouns = result.found.extra.get("cluster_nouns", {})
    return [f"{k}: {', '.join(nouns.get(str(k), [])) or '(no noun)'}" for k in sorted(result.found.captions)]


def cluster_name(result: PageResult, k: int) -> str | None:
    """The name cluster ``k`` stands for on the page: the first of its nouns in the current vocabulary (None: none)."""
    nouns = result.found.extra.get("cluster_nouns", {}).get(str(k), [])
    vocabulary = result.prediction.vocabulary
    found = [n for n in vocabulary if n in nouns]
    return found[0] if found else None


def cluster_annotations(result: PageResult) -> tuple[np.ndarray, list[tuple[np.ndarray, str]], dict[str, str]]:
    """``(image, [(mask, label)], colours)`` of the BBoost cluster map, at display size.

    A cluster has the colour of the name it stands for (:func:`cluster_name`), as in the segmentation, the overlay and
    the highlighted mask; a cluster whose nouns are not in the vocabulary is grey.
    """
    size = display_size(result.image)
    image = np.asarray(result.image.resize(size, Image.Resampling.BILINEAR))
    cmap = result.found.cluster_map
    if cmap is None:
        return image, [], {}
    clusters = resize_labels(cmap, size)
    name_colour = colours(result.prediction.vocabulary)
    masks, colour_of = [], {}
    for k, label in enumerate(cluster_labels(result)):
        mask = clusters == k
        if mask.any():
            masks.append((mask.astype(np.float32) * MASK_ALPHA, label))
            colour_of[label] = name_colour.get(cluster_name(result, k), UNNAMED_COLOUR)
    return image, masks, colour_of


def percent(share: float) -> float:
    """A share in % with one decimal; a share too small for that keeps one significant digit (never a false 0)."""
    value = 100 * share
    return round(value, 1) if value >= 0.1 or value == 0 else float(f"{value:.1g}")


def present_names(pred: Prediction) -> list[str]:
    """The names that label at least one pixel, in vocabulary order (what the legend shows)."""
    shares = pred.pixel_fraction()
    return [n for n in pred.vocabulary if shares[n] > 0]


def name_rows(pred: Prediction) -> list[list]:
    """Table rows ``[name, pixel share in %]`` of the names that label pixels (as the legend), in vocabulary order,
    then the unlabelled share if any."""
    shares = pred.pixel_fraction()
    rows = [[n, percent(shares[n])] for n in present_names(pred)]
    if shares["<unlabelled>"] > 0:
        rows.append([UNLABELLED_ROW, percent(shares["<unlabelled>"])])
    return rows


def cluster_rows(result: PageResult) -> list[list]:
    """Table rows ``[cluster, share in %, nouns, captions]``."""
    found = result.found
    if found.cluster_map is None:
        return []
    counts = np.bincount(found.cluster_map.ravel(), minlength=len(found.captions))
    total = max(int(counts.sum()), 1)
    nouns = found.extra.get("cluster_nouns", {})
    return [
        [k, round(100 * float(counts[k]) / total, 1), ", ".join(nouns.get(str(k), [])), " | ".join(found.captions[k])]
        for k in sorted(found.captions)
    ]


def highlight(result: PageResult, name: str | None) -> np.ndarray | None:
    """The image at display size with ``name``'s pixels kept and the rest dimmed (None: no such name)."""
    pred = result.prediction
    if not name or name not in pred.vocabulary:
        return None
    size = display_size(result.image)
    image = np.asarray(result.image.resize(size, Image.Resampling.BILINEAR)).astype(np.float32)
    mask = resize_labels(pred.label_map, size) == pred.vocabulary.index(name) + 1
    colour = np.array(palette(len(pred.vocabulary) + 1)[pred.vocabulary.index(name) + 1], np.float32)
    out = np.where(mask[..., None], 0.6 * image + 0.4 * colour, 0.25 * image + 0.75 * 255)
    return out.astype(np.uint8)
