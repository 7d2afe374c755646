#!/usr/bin/env python
"""Make the compact label-map cache that ``train_round.py`` carries to a GPU machine.

    python SynthSegMONAITraining/make_label_cache.py MAPS_DIR -o label_maps.npz
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SynthSegMONAI"))

from SynthSegMONAITrainingLib.label_cache import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
