"""Python packages the module needs: found, or installed after asking the user.

Nothing here runs at import time. PyTorch comes from the PyTorch extension's PyTorchUtils
(it picks the CUDA build that fits the machine); the other packages are read from
``Resources/requirements.txt`` and installed with ``slicer.packaging.pip_ensure``
(Slicer >= 5.12) or ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

TORCH_REQUIREMENT = "torch>=2.1"
# distribution name -> import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "pyyaml": "yaml", "scikit-image": "skimage"}

PYTORCH_EXTENSION_MISSING = (
    "SynthSegMONAI needs PyTorch, which Slicer installs through the 'PyTorch' extension. "
    "Install the PyTorch extension from the Extensions Manager (View > Extensions Manager), "
    "restart Slicer, then click Segment again.")


class DependencyError(RuntimeError):
    """A required package is missing and was not installed; the message says what to do."""


def requirements_file(module_dir: str | Path) -> Path:
    """``requirements.txt`` shipped with the module (installed tree or source tree)."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "Resources" / "requirements.txt",
                      module_dir.parent / "Resources" / "requirements.txt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"requirements.txt not found near {module_dir}")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def distribution_name(requirement: str) -> str:
    """``"nibabel>=5.0"`` -> ``"nibabel"``."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def is_importable(requirement: str) -> bool:
    """True when the package of ``requirement`` can be imported (version not checked)."""
    name = distribution_name(requirement).lower()
    module = IMPORT_NAMES.get(name, name.replace("-", "_"))
    return importlib.util.find_spec(module) is not None


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements whose package cannot be imported."""
    return [r for r in requirements if not is_importable(r)]


def ensure_torch(confirm: Callable[[str], bool]) -> None:
    """Install PyTorch via PyTorchUtils if it is missing (asks through ``confirm`` first)."""
    if is_importable("torch"):
        return
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError as e:
        raise DependencyError(PYTORCH_EXTENSION_MISSING) from e
    if not confirm("SynthSegMONAI needs PyTorch, which is not installed yet. Install it now? "
                   "This downloads several GB and can take a few minutes."):
        raise DependencyError("PyTorch is required: segmentation cancelled.")
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT.replace("torch", ""))
    if torch is None:
        raise DependencyError("PyTorch could not be installed; see the Python console for details.")


def ensure_packages(requirements: list[str], confirm: Callable[[str], bool],
                    requirements_path: str | Path | None = None) -> None:
    """Install the missing non-torch requirements, after asking through ``confirm``."""
    wanted = [r for r in requirements if distribution_name(r).lower() != "torch"]
    missing = missing_requirements(wanted)
    if not missing:
        return
    import slicer

    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        # Slicer >= 5.12: checks versions, asks the user, installs with progress.
        reqs = packaging.load_requirements(str(requirements_path)) if requirements_path else missing
        reqs = [r for r in reqs if distribution_name(str(r)).lower() != "torch"]
        packaging.pip_ensure(reqs, requester="SynthSegMONAI")
    else:
        if not confirm("SynthSegMONAI needs these Python packages, which are not installed yet:\n"
                       + "\n".join(missing) + "\n\nInstall them now?"):
            raise DependencyError("Required Python packages are missing: segmentation cancelled.")
        slicer.util.pip_install(missing)
    still_missing = missing_requirements(wanted)
    if still_missing:
        raise DependencyError("These packages could not be installed: " + ", ".join(still_missing))


def ensure_all(module_dir: str | Path, confirm: Callable[[str], bool]) -> None:
    """PyTorch first (through its extension), then the packages of ``requirements.txt``."""
    ensure_torch(confirm)
    path = requirements_file(module_dir)
    ensure_packages(read_requirements(path), confirm, path)
