"""AutoSeg: auto-vocabulary semantic segmentation with PyTorch Lightning.

``autoseg.load(source, **overrides)`` gives a ready pipeline (see :mod:`autoseg.api`); calling it on images gives
:class:`Prediction` objects. The heavy imports happen on first use, so ``import autoseg`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AutoSegPipeline", "Prediction", "load", "presets"]

if TYPE_CHECKING:
    from autoseg.api import load
    from autoseg.config import presets
    from autoseg.outputs import Prediction
    from autoseg.pipeline import AutoSegPipeline

_LAZY = {
    "load": "autoseg.api",
    "presets": "autoseg.config",
    "Prediction": "autoseg.outputs",
    "AutoSegPipeline": "autoseg.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
