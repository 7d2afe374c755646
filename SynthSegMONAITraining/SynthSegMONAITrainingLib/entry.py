"""What the training scripts (``train.py``, ``train_round.py``, ``make_label_cache.py``) share.

Importing this module needs nothing beyond the standard library: in Slicer the missing
training packages are installed first (the user is asked), then the script's command line runs.
"""

from __future__ import annotations

import importlib
import sys


def run_script(cli_module: str, argv: list[str], **kwargs) -> int:
    """Run ``<cli_module>.main(argv, **kwargs)``; in Slicer, after making sure its packages are there."""
    if hasattr(sys.modules.get("slicer"), "app"):
        import SynthSegMONAITraining

        problem = SynthSegMONAITraining.ensureRequirements()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
    return int(importlib.import_module(cli_module).main(argv, **kwargs) or 0)
