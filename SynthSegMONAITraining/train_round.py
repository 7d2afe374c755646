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
# The libraries sit beside this file and in ../SynthSegMONAI in the source tree, one folder up
# once installed in Slicer.
for _folder in (HERE.parent / "SynthSegMONAI", HERE.parent, HERE):
    if (_folder / "SynthSegMONAITrainingLib").is_dir() or (_folder / "SynthSegMONAILib").is_dir():
        sys.path.insert(0, str(_folder))

if __name__ == "__main__" and hasattr(sys.modules.get("slicer"), "app"):
    import SynthSegMONAITraining  # in Slicer: install missing packages first (asks the user)

    _problem = SynthSegMONAITraining.ensureRequirements()
    if _problem:
        print(f"error: {_problem}", file=sys.stderr)
        sys.exit(1)

from SynthSegMONAITrainingLib.round_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], started=STARTED))
