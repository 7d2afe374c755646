#!/usr/bin/env python
"""A training round bounded by a time budget, for short GPU windows (see docs/gpu-round.md).

    python SynthSegMONAITraining/train_round.py --time-budget 480 --output-dir DIR \\
        [--init MODEL.safetensors | --init none] [--label-maps DIR_OR_CACHE] \\
        [--device auto|cpu|cuda] [--crop-size N] [--batch-size N]

Writes round.json, metrics.csv, snapshot.png and the float16 model as model.safetensors.partN
(16 MiB chunks: ``cat model.safetensors.part0 model.safetensors.part1 > model.safetensors``).
"""

import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "SynthSegMONAI"))

from SynthSegMONAITrainingLib.round_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], started=STARTED))
