"""Train the embedding enhancer or fine-tune the segmenter / captioner. Run `python train.py --help` (LightningCLI)."""

import sys

from autoseg.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
