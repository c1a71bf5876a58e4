"""LightningModules (thin systems around the plain models in ``autoseg.models``) and their callbacks."""

from autoseg.lit.base import AutoSegModule
from autoseg.lit.captioner import CaptionerModule
from autoseg.lit.enhancer import EnhancerModule
from autoseg.lit.segmenter import SegmenterModule

__all__ = ["AutoSegModule", "CaptionerModule", "EnhancerModule", "SegmenterModule"]
