"""Train a SynthSeg-MONAI network on synthetic images.

    python train.py --config configs/synthseg_1.0.yaml --label-maps DIR --output-dir RUN
    torchrun --nproc_per_node=4 train.py --config ... --output-dir RUN
    Slicer --no-main-window --python-script <path of train.py> --config ... --output-dir RUN

``python train.py --help`` lists the options. In Slicer the script's path is
``SynthSegMONAITraining.scriptPath("train.py")``.

No ``#!`` line: Slicer takes a ``.py`` file that starts with one for a command-line module.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the libraries: beside this file and in ../SynthSegMONAI in the source tree, one folder up in Slicer
sys.path[:0] = [str(p) for p in (HERE.parent / "SynthSegMONAI", HERE.parent, HERE)
                if (p / "SynthSegMONAITrainingLib").is_dir() or (p / "SynthSegMONAILib").is_dir()]

from SynthSegMONAITrainingLib.entry import run_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_script("SynthSegMONAITrainingLib.cli", sys.argv[1:]))
