"""A training round bounded by a time budget, for short GPU windows (see docs/gpu-round.md).

    python SynthSegMONAITraining/train_round.py --time-budget 480 --output-dir DIR \\
        [--init MODEL.safetensors | --init none] [--label-maps DIR_OR_CACHE] \\
        [--device auto|cpu|cuda] [--crop-size N] [--batch-size N]

Writes round.json, metrics.csv, snapshot.png and the float16 model as model.safetensors.partN
(16 MiB chunks: ``cat model.safetensors.part0 model.safetensors.part1 > model.safetensors``).

No ``#!`` line: Slicer takes a ``.py`` file that starts with one for a command-line module.
"""

import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
# the libraries: beside this file and in ../SynthSegMONAI in the source tree, one folder up in Slicer
sys.path[:0] = [str(p) for p in (HERE.parent / "SynthSegMONAI", HERE.parent, HERE)
                if (p / "SynthSegMONAITrainingLib").is_dir() or (p / "SynthSegMONAILib").is_dir()]

from SynthSegMONAITrainingLib.entry import run_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script("SynthSegMONAITrainingLib.round_cli", sys.argv[1:], started=STARTED))
