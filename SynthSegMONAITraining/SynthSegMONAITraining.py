"""SynthSegMONAITraining: a headless Slicer module that runs or resumes synthesis-based training.

Slicer scripts and other modules drive it through its logic::

    import SynthSegMONAITraining
    logic = SynthSegMONAITraining.SynthSegMONAITrainingLogic()
    logic.train(["--config", "synthseg_1.0.yaml", "--label-maps", maps, "--output-dir", run])
    logic.resume(run)

The logic imports without Slicer (the ``slicer`` import is guarded), so the same class runs in
plain Python.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    )
except ImportError:  # plain Python: keep the logic usable
    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest:  # type: ignore[no-redef]
        pass


class SynthSegMONAITraining(ScriptedLoadableModule):
    """Module description (no widget: training runs headless or from scripts)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SynthSeg MONAI Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SynthSeg-MONAI contributors"]
        self.parent.helpText = (
            "Trains SynthSeg networks on synthetic images generated from label maps (no GUI). "
            "Run <code>Slicer --no-main-window --python-script train.py ...</code> or use "
            "<code>SynthSegMONAITrainingLogic().train([...])</code> from a script.")
        self.parent.acknowledgementText = (
            "SynthSeg: Billot et al., Medical Image Analysis 2023. Synthesis with Cornucopia; network "
            "and losses with MONAI.")
        self.parent.hidden = True


class SynthSegMONAITrainingLogic(ScriptedLoadableModuleLogic):
    """Runs or resumes training with the same options as ``train.py``."""

    def train(self, args: list[str]) -> int:
        """Run training with command-line style arguments; returns the exit code."""
        from SynthSegMONAITrainingLib.cli import main

        return main(list(args))

    def resume(self, output_dir: str, extra_args: list[str] | None = None) -> int:
        """Continue the run saved in ``output_dir`` exactly where its checkpoint left it."""
        return self.train(["--output-dir", str(output_dir), "--resume", *(extra_args or [])])

    def default_config(self):
        """The default configuration (SynthSeg 1.0 training)."""
        from SynthSegMONAITrainingLib.config import Config

        return Config()


class SynthSegMONAITrainingTest(ScriptedLoadableModuleTest):
    """Module self-test: the logic loads and the default configuration is valid."""

    def runTest(self):
        self.test_default_config()

    def test_default_config(self):
        from SynthSegMONAITrainingLib.config import validate

        validate(SynthSegMONAITrainingLogic().default_config())
