"""Make the compact label-map cache that ``train_round.py`` carries to a GPU machine.

    python SynthSegMONAITraining/make_label_cache.py MAPS_DIR -o label_maps.npz

No ``#!`` line: Slicer takes a ``.py`` file that starts with one for a command-line module.
"""

import sys
from pathlib import Path

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

from SynthSegMONAITrainingLib.label_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
