"""Command lines only (argument parsing, exit codes): ``infer``, ``eval``, ``train`` and ``app``. No library module
imports this package; the entry scripts (``infer.py``, ``eval.py``, ``train.py``, ``python -m autoseg.app``) do."""
