"""The interactive demo page: ``python -m autoseg.app`` (Gradio; ``pip install -e ".[app]"``).

- :mod:`autoseg.app.backend`: what the page does, without Gradio (load an upload, run the pipeline with the page's
  settings, edit the vocabulary and re-segment, write the files ``infer.py`` writes).
- :mod:`autoseg.app.page`: the Gradio page around it.
- :mod:`autoseg.app.__main__`: the command line (the pipeline flags of ``infer.py``, ``--host``, ``--port``).

Importing this package does not import Gradio.
"""
