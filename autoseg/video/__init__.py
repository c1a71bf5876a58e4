"""Video: one vocabulary per clip, temporally smoothed segmentation, per-clip outputs (see :mod:`autoseg.video.run`)."""

DEFAULT_SMOOTHING = 0.7  # chosen on the development clips (seed 777): flicker under half the per-frame flow's
