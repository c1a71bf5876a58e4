"""What ``infer.py`` writes and ``eval.py`` reads, and the one writer that produces it.

- :mod:`autoseg.outputs.files`: the per-image format (``IMG.png``, ``IMG.json``, ``IMG_overlay.jpg``), committed
  together, JSON last.
- :mod:`autoseg.outputs.manifest`: the run's lock, status lines and ``manifest.json``.
- :mod:`autoseg.outputs.writer`: segment a batch and commit each image's set, in every mode (one process or many).
"""

from autoseg.outputs.files import (
    UNLABELLED,
    Prediction,
    palette,
    prediction_complete,
    prediction_files,
    read_prediction,
    remove_prediction,
    render_overlay,
    write_prediction,
)
from autoseg.outputs.manifest import OutputBusyError, RunManifest, read_status_lines
from autoseg.outputs.writer import OutputWriteError, SegmentationWriter, plan_outputs

__all__ = [
    "UNLABELLED",
    "OutputBusyError",
    "OutputWriteError",
    "Prediction",
    "RunManifest",
    "SegmentationWriter",
    "palette",
    "plan_outputs",
    "prediction_complete",
    "prediction_files",
    "read_prediction",
    "read_status_lines",
    "remove_prediction",
    "render_overlay",
    "write_prediction",
]
