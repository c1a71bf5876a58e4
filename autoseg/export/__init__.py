"""Auto-labelling: turn ``infer.py`` outputs into files annotation tools and trainers read.

``python -m autoseg.export PRED_DIR --to FORMAT --out DEST`` (see :mod:`autoseg.export.__main__`), or
:func:`export_predictions`. Formats (:data:`FORMATS`, one module each): ``coco`` (instances, RLE masks),
``coco-panoptic``, ``labelstudio`` (tasks with brush pre-annotations + label config), ``cvat`` (Segmentation Mask 1.1
zip), ``folder`` (AutoSeg's ``images/`` + ``masks/`` + ``classes.txt``). With a class list, names are mapped onto the
classes by LAVE exactly as ``eval.py`` maps them (:mod:`autoseg.export.mapping`).
"""

from autoseg.export.formats import FORMATS
from autoseg.export.run import SUMMARY, check_destination, export_predictions

__all__ = ["FORMATS", "SUMMARY", "check_destination", "export_predictions"]
