#!/usr/bin/env python
"""Train a SynthSeg-MONAI network on synthetic images.

    python train.py --config configs/synthseg_1.0.yaml --label-maps DIR --output-dir RUN
    torchrun --nproc_per_node=4 train.py --config ... --output-dir RUN
    Slicer --no-main-window --python-script train.py --config ... --output-dir RUN

``python train.py --help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from SynthSegMONAITrainingLib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
