"""Make the compact label-map cache that ``train_round.py`` carries to a GPU machine.

    python SynthSegMONAITraining/make_label_cache.py MAPS_DIR -o label_maps.npz

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
    sys.exit(run_script("SynthSegMONAITrainingLib.label_cache", sys.argv[1:]))
