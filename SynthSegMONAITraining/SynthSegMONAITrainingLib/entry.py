"""What the training entry points (``train.py``, ``train_round.py``, ``make_label_cache.py``, the
``train`` subcommand) share.

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


def train_command(argv: list[str] | None = None) -> int:
    """``synthseg-monai train`` and ``synthseg-monai-train``: the training command line.

    Registered in the ``synthseg_monai.subcommands`` entry-point group, so the engine's command
    line runs it without importing the training package by name.
    """
    try:
        cli = importlib.import_module("SynthSegMONAITrainingLib.cli")
    except ImportError as e:
        print(f"error: training is not available ({e}); install synthseg-monai[train]", file=sys.stderr)
        return 1
    return int(cli.main(argv) or 0)


class ScriptFailed(RuntimeError):
    """A command line run from a MONAI bundle exited with an error."""


def run_or_raise(cli_module: str, argv: list[str]) -> None:
    """:func:`run_script` for MONAI's bundle runner, which ignores return values: raise on failure."""
    code = run_script(cli_module, [str(a) for a in argv])
    if code != 0:
        raise ScriptFailed(f"{cli_module} exited with status {code}; see the messages above")
