"""The Gradio page: input (upload or sample), settings, the segmentation with its legend and names, the vocabulary
editor, the BBoost clusters and the downloads; below them a short clip (upload, the overlay video, the clip's names).
Each handler returns the page's new values; a bad input or a failed request puts a message in the status box and
leaves the rest of the page as it was."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402

from autoseg.app.backend import (  # noqa: E402
    DemoBackend,
    PageResult,
    Settings,
    cluster_annotations,
    cluster_rows,
    colours,
    edit_vocabulary,
    highlight,
    label_annotations,
    name_rows,
    present_names,
)
from autoseg.app.clips import (  # noqa: E402
    DEFAULT_CLIP_FRAMES,
    ClipResult,
    ClipUpload,
    clip_legend,
    clip_rows,
    describe_clip,
    keep_clip,
    segment_upload,
)
from autoseg.models.segmenters import segmenter_source  # noqa: E402
from autoseg.utils.io import ImageReadError  # noqa: E402
from autoseg.utils.video import VIDEO_EXTENSIONS, VideoReadError  # noqa: E402

log = logging.getLogger("autoseg.app")

NAME_HEADERS = ["name", "pixel share (%)"]
CLUSTER_HEADERS = ["cluster", "share (%)", "nouns", "captions"]
CLIP_HEADERS = ["name", "pixel share (%)", "frames"]  # frames: those in which the name labels pixels
NO_INPUT = "Upload an image or pick a sample first."
NO_CLIP = "Upload a short clip first."
SESSION_SECONDS = 600


class Handlers:
    """The page's event handlers, callable without a browser (tests call them directly).

    ``run`` returns ``(result, segmentation, names, name choice, selected view, clusters, cluster table, downloads,
    status)``; ``edit`` the same and the new-name box. A value that should stay as it is is ``gr.skip()``.
    """

    def __init__(self, backend: DemoBackend, samples: Sequence[Path], clip_frames: int = DEFAULT_CLIP_FRAMES):
        self.backend = backend
        self.samples = [Path(s) for s in samples]
        self.clip_frames = clip_frames

    # ------------------------------------------------------------------------------------------------------ input
    def choose_upload(self, path: str | None) -> tuple:
        """An uploaded file: ``(chosen, preview, status)`` and the results of the image before, cleared (they belong
        to it); a bad file leaves nothing chosen and says why. The upload is read into memory and its temporary file
        removed, so uploads do not pile up on the server's disk."""
        if not path:
            return None, None, NO_INPUT, *CLEARED
        name = Path(path).name
        try:
            image = self.backend.load(path, name)
        except ImageReadError as e:
            return None, None, f"Cannot use this file: {e}", *CLEARED
        finally:
            forget_upload(path)
        return (image, name), image, f"{name}: {image.width} x {image.height} px. Press Segment.", *CLEARED

    def choose_sample(self, evt: gr.SelectData) -> tuple:
        """A sample picked in the gallery (``evt.index``): what :meth:`choose_upload` returns, and the upload box
        emptied (the sample replaces any file in it)."""
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        return *self.choose_upload(str(self.samples[index])), None

    # ------------------------------------------------------------------------------------------------------ results
    def run(self, chosen, seed, k_min, k_max, n_passes, threshold) -> tuple:
        """Cluster, caption and segment the chosen image with the page's settings."""
        if chosen is None:
            return self._failed(NO_INPUT)
        image, name = chosen
        try:
            settings = Settings.parse(seed, k_min, k_max, n_passes, threshold)
            settings.apply(self.backend.config)
        except ValueError as e:
            return self._failed(f"Check the settings: {e}")
        try:
            result = self.backend.analyse(image, name, settings)
        except Exception as e:  # noqa: BLE001 - one failed request must not take the page down
            log.exception("segmentation of %s failed", name)
            return self._failed(f"Segmentation failed ({type(e).__name__}: {e}); try another image or other settings.")
        pred = result.prediction
        seconds = pred.extra.get("seconds_vocabulary", 0) + pred.extra["seconds_segmenter"]
        return self._show(
            result,
            f"{name}: {describe_names(pred)} ({seconds:.1f} s). Hover a name in the legend to highlight its mask; "
            "click it to edit it.",
        )

    def edit(self, action: str, result: PageResult | None, name, new_name, threshold) -> tuple:
        """Edit the vocabulary (``remove``, ``add``, ``rename``), or ``resegment`` it with the current threshold, or
        ``reset`` it to the names found; then re-segment (the segmenter alone). Returns the run outputs + new-name box.
        """
        if result is None:
            return (*self._failed("Segment an image first; then edit its names."), gr.skip())
        vocabulary = result.prediction.vocabulary
        try:
            if action == "reset":
                vocabulary = result.found.vocabulary
            elif action != "resegment":
                vocabulary = edit_vocabulary(vocabulary, action, name or "", new_name or "")
            if threshold is None or threshold == "":
                raise ValueError("setting 'segmenter threshold' is empty; enter a number in [0, 1]")
            out = self.backend.resegment(result, vocabulary, float(threshold))
        except ValueError as e:
            return (*self._failed(str(e)), gr.skip())
        except Exception as e:  # noqa: BLE001
            log.exception("re-segmenting %s failed", result.name)
            return (*self._failed(f"Re-segmenting failed ({type(e).__name__}: {e})."), gr.skip())
        done = {
            "remove": f"Removed '{name}'",
            "add": f"Added '{' '.join(str(new_name).split())}'",
            "rename": f"Renamed '{name}' to '{' '.join(str(new_name).split())}'",
            "resegment": f"Threshold {out.settings.threshold:g}",
            "reset": "Back to the names found",
        }[action]
        status = f"{done}; re-segmented without recaptioning: {describe_names(out.prediction)}."
        return (*self._show(out, status), "")

    def pick(self, result: PageResult | None, evt: gr.SelectData):
        """A name clicked in the legend or the names table becomes the one to edit (and is highlighted)."""
        if result is None:
            return gr.skip()
        value = evt.row_value[0] if getattr(evt, "row_value", None) else evt.value
        return value if value in result.prediction.vocabulary else gr.skip()

    def select_view(self, result: PageResult | None, name: str | None):
        """The image with ``name``'s mask highlighted (the rest dimmed)."""
        return None if result is None else highlight(result, name)

    def _show(self, result: PageResult, status: str) -> tuple:
        pred = result.prediction
        image, masks = label_annotations(result)
        cimage, cmasks, ccolours = cluster_annotations(result)
        return (
            result,
            gr.AnnotatedImage(value=(image, masks), color_map=colours(pred.vocabulary)),
            name_rows(pred),
            gr.Dropdown(choices=list(pred.vocabulary), value=None),
            None,
            gr.AnnotatedImage(value=(cimage, cmasks), color_map=ccolours),
            cluster_rows(result),
            [str(f) for f in result.files],
            status,
        )

    @staticmethod
    def _failed(status: str) -> tuple:
        return (*(gr.skip(),) * 8, status)

    # ------------------------------------------------------------------------------------------------------ clips
    def choose_clip(self, path: str | None, previous: ClipUpload | None, previous_result: ClipResult | None) -> tuple:
        """An uploaded clip: ``(chosen clip, first frame, clip status)`` and the clip results emptied (``run_clip``'s
        outputs but the status). The clip before and its results are removed from the server, and so is the upload
        (a copy is kept until the clip is segmented); a bad file leaves nothing chosen and says why."""
        self.backend.release(previous)
        self.backend.release(previous_result)
        if not path:
            return None, None, NO_CLIP, *CLIP_CLEARED
        name = Path(path).name
        try:
            upload, first = keep_clip(self.backend, path, name)
        except VideoReadError as e:
            return None, None, f"Cannot use this clip: {e}", *CLIP_CLEARED
        finally:
            forget_upload(path)
        w, h = upload.size
        rate = f" at {upload.fps:.3g} fps" if upload.fps else ""
        status = f"{name}: {w} x {h} px{rate}. Press Segment clip (its first {self.clip_frames} frames)."
        return upload, first, status, *CLIP_CLEARED

    def run_clip(self, upload: ClipUpload | None, previous: ClipResult | None, seed, k_min, k_max, n_passes, threshold):
        """Segment the chosen clip's first frames with the page's seed and threshold. Returns ``(result, overlay
        video, legend, names table, downloads, status)``; a failure changes only the status."""
        if upload is None:
            return (*(gr.skip(),) * 5, NO_CLIP)
        try:
            settings = Settings.parse(seed, k_min, k_max, n_passes, threshold)
            settings.apply(self.backend.config)
        except ValueError as e:
            return (*(gr.skip(),) * 5, f"Check the settings: {e}")
        try:
            result = segment_upload(self.backend, upload, settings, self.clip_frames)
        except VideoReadError as e:  # the clip itself is bad: what was shown of it goes
            self.backend.release(previous)
            return (*CLIP_CLEARED, f"Cannot segment this clip: {e}")
        except Exception as e:  # noqa: BLE001 - one failed request must not take the page down
            log.exception("segmentation of clip %s failed", upload.name)
            return (*(gr.skip(),) * 5, f"Segmentation failed ({type(e).__name__}: {e}); try another clip.")
        self.backend.release(previous)
        legend, colour_of = clip_legend(result)
        return (
            result,
            str(result.overlay),
            gr.HighlightedText(value=legend, color_map=colour_of),
            clip_rows(result),
            [str(f) for f in result.files],
            f"{describe_clip(result)}. The overlay shows every frame with the clip's legend.",
        )


def forget_upload(path: str) -> None:
    """Remove an uploaded file from Gradio's upload folder once it is read (never a file outside that folder)."""
    from gradio.utils import get_upload_folder

    file, uploads = Path(path).resolve(), Path(get_upload_folder()).resolve()
    if file.is_relative_to(uploads):
        file.unlink(missing_ok=True)


# the result outputs (result, segmentation, names, name choice, selected view, clusters, cluster table, downloads)
# emptied when another image is chosen
CLEARED = (None, None, [], gr.Dropdown(choices=[], value=None), None, None, [], None)
# the clip's outputs (result, overlay video, legend, names table, downloads) emptied when another clip is chosen
CLIP_CLEARED = (None, None, None, [], None)


def describe_names(pred) -> str:
    """The names found and those that label pixels (the legend and the table show only those)."""
    shown = present_names(pred)
    if not pred.vocabulary:
        return "no names (every pixel is unlabelled)"
    if len(shown) == len(pred.vocabulary):
        return f"{len(shown)} names: {', '.join(shown)}"
    lost = [n for n in pred.vocabulary if n not in shown]
    return (
        f"{len(pred.vocabulary)} names found, {len(shown)} label pixels: {', '.join(shown) or 'none'} "
        f"(no pixels: {', '.join(lost)})"
    )


def build_page(
    backend: DemoBackend, samples: Sequence[Path], source: str = "", clip_frames: int = DEFAULT_CLIP_FRAMES
) -> gr.Blocks:
    """The page (not launched). Model calls are queued one at a time; light events (uploads, picks) are not.

    Args:
        source: how the pipeline was chosen, shown on the page (e.g. ``--preset demo``).
        clip_frames: frames of an uploaded clip that are segmented (its first ones).
    """
    h = Handlers(backend, samples, clip_frames)
    d = backend.defaults
    k_top = max(16, d.k_max)
    seg = backend.config.segmenter
    source = source or f"BLIP `{backend.config.blip}`, segmenter {seg.name} `{segmenter_source(seg)}`"
    # temporary files (Gradio's copies of what the page shows) older than 10 minutes go every minute
    with gr.Blocks(title="AutoSeg demo", analytics_enabled=False, delete_cache=(60, SESSION_SECONDS)) as page:
        gr.Markdown(
            "## AutoSeg: auto-vocabulary semantic segmentation\n"
            "Upload an image or pick a sample, then press **Segment**. AutoSeg groups the image (BBoost clusters), "
            "captions each group (BLIP), takes the nouns as the vocabulary and segments the image with it. Edit the "
            f"names to re-segment without recaptioning. Pipeline: {source}."
        )
        # a session's memory (its image, label map and cluster map) goes when its tab closes, or after idle minutes
        chosen = gr.State(None, time_to_live=SESSION_SECONDS)
        result = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=backend.release)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                upload = gr.File(label="Upload an image", type="filepath", height=140, elem_id="upload")
                gallery = gr.Gallery(
                    value=[str(s) for s in h.samples],
                    label="...or pick a sample",
                    columns=3,
                    height=220,
                    object_fit="contain",
                    allow_preview=False,
                    interactive=False,
                    elem_id="samples",
                )
                preview = gr.Image(label="Input", interactive=False, height=200, elem_id="preview")
                with gr.Accordion("Settings", open=True):
                    seed = gr.Number(d.seed, label="seed", precision=0, minimum=0, elem_id="seed")
                    k_min = gr.Slider(1, k_top, value=d.k_min, step=1, label="k min (fewest clusters)")
                    k_max = gr.Slider(1, k_top, value=d.k_max, step=1, label="k max (most clusters)")
                    n_passes = gr.Slider(1, 10, value=d.n_passes, step=1, label="caption passes per cluster")
                    threshold = gr.Slider(
                        0,
                        1,
                        value=d.threshold,
                        step=0.05,
                        label="segmenter threshold (0: every pixel gets a name)"
                        if backend.has_threshold
                        else "segmenter threshold (this segmenter has none)",
                        interactive=backend.has_threshold,
                    )
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=3):
                status = gr.Textbox(label="Status", value=NO_INPUT, interactive=False, lines=2, elem_id="status")
                with gr.Row():
                    segmentation = gr.AnnotatedImage(
                        label="Segmentation: hover a name to highlight its mask, click it to edit it",
                        height=400,
                        scale=3,
                        elem_id="segmentation",
                    )
                    with gr.Column(scale=2):
                        names = gr.Dataframe(
                            headers=NAME_HEADERS, label="Names", interactive=False, column_count=2, elem_id="names"
                        )
                        selected = gr.Image(label="Selected name", interactive=False, height=200, elem_id="selected")
                with gr.Row(equal_height=True):
                    name = gr.Dropdown(choices=[], label="Name to edit", interactive=True, elem_id="name")
                    new_name = gr.Textbox(label="New name (to add, or to rename to)", elem_id="new-name")
                with gr.Row():
                    remove = gr.Button("Remove", elem_id="remove")
                    rename = gr.Button("Rename", elem_id="rename")
                    add = gr.Button("Add", elem_id="add")
                    resegment = gr.Button("Re-segment", elem_id="resegment")
                    reset = gr.Button("Reset names", elem_id="reset")
                with gr.Accordion("BBoost clusters: each cluster's captions and nouns", open=True):
                    with gr.Row():
                        clusters = gr.AnnotatedImage(label="Cluster map", height=320, scale=2, elem_id="clusters")
                        cluster_table = gr.Dataframe(
                            headers=CLUSTER_HEADERS,
                            interactive=False,
                            wrap=True,
                            column_count=4,
                            column_widths=["12%", "14%", "20%", "54%"],
                            scale=3,
                            elem_id="cluster-table",
                        )
                downloads = gr.File(
                    label="Downloads: label map (PNG), JSON, overlay (the files infer.py writes)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="downloads",
                )
        clip_chosen = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=backend.release)
        clip_result = gr.State(None, time_to_live=SESSION_SECONDS, delete_callback=backend.release)
        with gr.Accordion(f"Short clip: one vocabulary for its first {clip_frames} frames", open=True):
            gr.Markdown(
                f"Upload a short video ({' '.join(VIDEO_EXTENSIONS)}) and press **Segment clip**: its first "
                f"{clip_frames} frames are segmented with one vocabulary (found on key frames), smoothed over time, "
                "as `infer.py` does for a video. The seed and threshold settings apply; the k range and caption passes "
                "are the pipeline's."
            )
            with gr.Row():
                with gr.Column(scale=1, min_width=320):
                    clip_upload = gr.File(
                        label="Upload a short clip",
                        file_types=list(VIDEO_EXTENSIONS),
                        type="filepath",
                        height=140,
                        elem_id="clip-upload",
                    )
                    clip_preview = gr.Image(label="First frame", interactive=False, height=200, elem_id="clip-preview")
                    run_clip = gr.Button("Segment clip", variant="primary", elem_id="run-clip")
                with gr.Column(scale=3):
                    clip_status = gr.Textbox(
                        label="Clip status", value=NO_CLIP, interactive=False, lines=2, elem_id="clip-status"
                    )
                    with gr.Row():
                        clip_video = gr.Video(
                            label="Overlay: every segmented frame with the clip's legend",
                            interactive=False,
                            loop=True,
                            height=400,
                            scale=3,
                            elem_id="clip-video",
                        )
                        with gr.Column(scale=2):
                            clip_names = gr.HighlightedText(
                                label="The clip's names", show_inline_category=False, elem_id="clip-legend"
                            )
                            clip_table = gr.Dataframe(
                                headers=CLIP_HEADERS,
                                interactive=False,
                                column_count=3,
                                column_widths=["40%", "30%", "30%"],
                                elem_id="clip-names",
                            )
                    clip_downloads = gr.File(
                        label="Downloads: overlay video (MP4), JSON (the files infer.py writes for a clip)",
                        file_count="multiple",
                        interactive=False,
                        elem_id="clip-downloads",
                    )

        outputs = [result, segmentation, names, name, selected, clusters, cluster_table, downloads, status]
        chosen_outputs = [chosen, preview, status, *outputs[:-1]]
        upload.upload(h.choose_upload, upload, chosen_outputs)
        upload.clear(lambda: (None, None, NO_INPUT, *CLEARED), None, chosen_outputs)
        gallery.select(h.choose_sample, None, [*chosen_outputs, upload])
        model = {"concurrency_limit": 1, "concurrency_id": "models"}
        run.click(h.run, [chosen, seed, k_min, k_max, n_passes, threshold], outputs, **model)
        edits = [(remove, "remove"), (rename, "rename"), (add, "add"), (resegment, "resegment"), (reset, "reset")]
        for button, action in edits:
            button.click(_bind(h.edit, action), [result, name, new_name, threshold], [*outputs, new_name], **model)
        segmentation.select(h.pick, result, name)
        names.select(h.pick, result, name)
        name.change(h.select_view, [result, name], selected)

        clip_outputs = [clip_result, clip_video, clip_names, clip_table, clip_downloads, clip_status]
        clip_chosen_outputs = [clip_chosen, clip_preview, clip_status, *clip_outputs[:-1]]
        clip_upload.upload(h.choose_clip, [clip_upload, clip_chosen, clip_result], clip_chosen_outputs)
        clip_upload.clear(h.choose_clip, [clip_upload, clip_chosen, clip_result], clip_chosen_outputs)
        clip_settings = [clip_chosen, clip_result, seed, k_min, k_max, n_passes, threshold]
        run_clip.click(h.run_clip, clip_settings, clip_outputs, **model)
    return page


def _bind(fn, action: str):
    """``fn`` with its first argument fixed (a named function, so Gradio's API page shows a useful name)."""

    def handler(*args):
        return fn(action, *args)

    handler.__name__ = f"{action}_name" if action in ("remove", "add", "rename") else action
    return handler
