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
# The libraries sit beside this file (and in ../SynthSegMONAI) in the source tree, one folder up
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

from SynthSegMONAITrainingLib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
