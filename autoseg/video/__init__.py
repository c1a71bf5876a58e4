"""Video: one vocabulary per clip, temporally smoothed segmentation, per-clip outputs (see :mod:`autoseg.video.run`)."""
