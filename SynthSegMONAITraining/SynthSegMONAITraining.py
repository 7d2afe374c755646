"""SynthSegMONAITraining: a headless Slicer module that runs or resumes synthesis-based training.

Slicer scripts and other modules drive it through its logic::

    import SynthSegMONAITraining
    logic = SynthSegMONAITraining.SynthSegMONAITrainingLogic()
    logic.train(["--config", "synthseg_1.0.yaml", "--label-maps", maps, "--output-dir", run])
    logic.resume(run)

Headless: ``Slicer --no-main-window --python-script <path of train.py> ...``; the path is
``SynthSegMONAITraining.scriptPath("train.py")``. In Slicer, the first use asks to install
the Python packages training needs (PyTorch through the PyTorch extension, the others from
``Resources/requirements.txt`` and ``Resources/requirements-training.txt``).

The logic imports without Slicer (the ``slicer`` import is guarded), so the same class runs in
plain Python, where nothing is installed for you (``pip install .[train]``).
"""

from __future__ import annotations

import os
import sys

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
# The entry scripts are installed in this subfolder, not beside the module: Slicer would take
# any .py file of the scripted-modules folder for a module.
SCRIPTS_FOLDER = "SynthSegMONAITrainingScripts"
ENTRY_SCRIPTS = ("train.py", "train_round.py", "make_label_cache.py")
# In the source tree the segmentation module's packages sit in ../SynthSegMONAI; once installed,
# both modules share one folder.
for _folder in (os.path.join(os.path.dirname(MODULE_DIR), "SynthSegMONAI"), MODULE_DIR):
    if os.path.isdir(_folder) and _folder not in sys.path:
        sys.path.insert(0, _folder)

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
        def delayDisplay(self, message, msec=None):
            print(message)

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # plain Python or slicer-core: no translations
    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

DOCUMENTATION_URL = "https://github.com/SynthSegMONAI/SlicerSynthSegMONAI#training-synthseg-monai-networks"


class SynthSegMONAITraining(ScriptedLoadableModule):
    """Module description (no widget: training runs headless or from scripts)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SynthSeg MONAI Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SynthSeg-MONAI contributors"]
        self.parent.helpText = _(
            "Trains SynthSeg networks on synthetic images generated from label maps (no GUI). "
            "Run <code>Slicer --no-main-window --python-script train.py ...</code> (the script's "
            "path: <code>SynthSegMONAITraining.scriptPath('train.py')</code>) or use "
            "<code>SynthSegMONAITrainingLogic().train([...])</code> from a script. The first run "
            "offers to install the Python packages that training needs.<br><br>"
            "Documentation: <a href=\"{url}\">training SynthSeg-MONAI networks</a>.").format(
                url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "SynthSeg: Billot et al., Medical Image Analysis 2023. Synthesis with Cornucopia; network "
            "and losses with MONAI.")
        self.parent.hidden = True


def scriptPath(name: str = "train.py") -> str:
    """Path of an entry script (``train.py``, ``train_round.py``, ``make_label_cache.py``)."""
    if name not in ENTRY_SCRIPTS:
        raise ValueError(f"unknown script {name!r}: choose one of {', '.join(ENTRY_SCRIPTS)}")
    installed = os.path.join(MODULE_DIR, SCRIPTS_FOLDER, name)
    return installed if os.path.isfile(installed) else os.path.join(MODULE_DIR, name)


def _inSlicerApplication() -> bool:
    slicer = sys.modules.get("slicer")
    return slicer is not None and hasattr(slicer, "app") and hasattr(slicer.app, "majorVersion")


def _confirm(text: str) -> bool:
    import slicer

    return slicer.util.confirmOkCancelDisplay(text)


def ensureRequirements(confirm=None) -> str:
    """In Slicer, install what training needs (asking first); '' when ready, else why not.

    Outside the Slicer application nothing is checked or installed.
    """
    if not _inSlicerApplication():
        return ""
    import slicer

    from SynthSegMONAISlicerLib import dependencies
    from SynthSegMONAISlicerLib.slicer_version import too_old_message

    problem = too_old_message(slicer.app, _("SynthSeg MONAI Training"))
    if problem:
        return problem
    try:
        dependencies.ensure_all(MODULE_DIR, confirm or _confirm, extra_files=(dependencies.TRAINING_REQUIREMENTS,),
                                requester="SynthSegMONAITraining")
    except (dependencies.DependencyError, FileNotFoundError) as e:
        return str(e)
    return ""


class SynthSegMONAITrainingLogic(ScriptedLoadableModuleLogic):
    """Runs or resumes training with the same options as ``train.py``."""

    def train(self, args: list[str]) -> int:
        """Run training with command-line style arguments; returns the exit code."""
        problem = ensureRequirements()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
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
    """Module self-test: the entry scripts are installed, the default configuration is valid."""

    def runTest(self):
        self.test_entry_scripts()
        self.test_default_config()

    def test_entry_scripts(self):
        for name in ENTRY_SCRIPTS:
            path = scriptPath(name)
            if not os.path.isfile(path):
                raise AssertionError(f"entry script not found: {path}")
            with open(path, encoding="utf-8") as f:
                if f.read(2) == "#!":
                    raise AssertionError(f"{path} starts with #!: Slicer would run it as a CLI module")

    def test_default_config(self):
        problem = ensureRequirements()
        if problem:
            self.delayDisplay(_("Training packages not available, configuration test skipped: {problem}")
                              .format(problem=problem))
            return
        from SynthSegMONAITrainingLib.config import validate

        validate(SynthSegMONAITrainingLogic().default_config())
