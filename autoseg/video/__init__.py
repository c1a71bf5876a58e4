"""Video: one vocabulary per clip, temporally smoothed segmentation, per-clip outputs (see :mod:`autoseg.video.run`)."""

# Chosen on the development clips (ShapesWorld seed 777, demo preset; see autoseg.video.smoothing): the past's weight
# in the moving average of still pixels, and the colour change (0-255) above which a pixel counts as moving.
DEFAULT_SMOOTHING = 0.9
DEFAULT_MOTION = 25.0
