"""AutoSeg: auto-vocabulary semantic segmentation with PyTorch Lightning."""

__version__ = "0.1.0"
