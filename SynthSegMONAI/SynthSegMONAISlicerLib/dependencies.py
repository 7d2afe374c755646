"""Python packages the modules need: found, or installed after asking the user.

Nothing here runs at import time. PyTorch comes from the PyTorch extension's PyTorchUtils
(it picks the CUDA build that fits the machine); the other packages are read from
requirements files in ``Resources/`` and installed with ``slicer.packaging.pip_ensure``
(Slicer >= 5.12) or ``slicer.util.pip_install``. Whatever goes wrong (the user declines, pip
fails, a package is still missing afterwards) ends in a :class:`DependencyError` whose
message is meant for the user.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core or plain Python: no translations
    def _(text: str) -> str:
        return text

TORCH_REQUIREMENT = "torch>=2.1"
REQUIREMENTS = "requirements.txt"
TRAINING_REQUIREMENTS = "requirements-training.txt"
# distribution name -> import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "pyyaml": "yaml", "scikit-image": "skimage"}


class DependencyError(RuntimeError):
    """A required package is missing and was not installed; the message says what to do."""


def pytorch_extension_missing(requester: str) -> str:
    return _("{requester} needs PyTorch, which Slicer installs through the 'PyTorch' extension. "
             "Install the PyTorch extension from the Extensions Manager (View > Extensions "
             "Manager), restart Slicer, then try again.").format(requester=requester)


def requirements_file(module_dir: str | Path, name: str = REQUIREMENTS) -> Path:
    """Requirements file ``name`` shipped with the module (installed tree or source tree)."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "Resources" / name, module_dir.parent / "Resources" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} not found near {module_dir}")


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blank lines and pip options dropped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def distribution_name(requirement: str) -> str:
    """``"nibabel>=5.0"`` -> ``"nibabel"``."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def import_name(requirement: str) -> str:
    """The name to import for ``requirement`` (``"pyyaml>=6"`` -> ``"yaml"``)."""
    name = distribution_name(requirement).lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def is_importable(requirement: str) -> bool:
    """True when the package of ``requirement`` can be imported (version not checked)."""
    try:
        return importlib.util.find_spec(import_name(requirement)) is not None
    except (ImportError, ValueError):
        return False


def torch_available() -> bool:
    """True when PyTorch can be imported (without importing it)."""
    return is_importable("torch")


def _release(version: str) -> tuple[int, ...]:
    """Numeric release part of a version: ``"2.1.0+cu121"`` -> ``(2, 1, 0)``."""
    parts = []
    for piece in re.split(r"[.+-]", version):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def version_satisfies(version: str, requirement: str) -> bool:
    """True when ``version`` meets the version specifiers of ``requirement``."""
    spec = requirement[len(distribution_name(requirement)):].split(";", 1)[0].strip()
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        Version = None  # noqa: N806
    if Version is not None:
        try:
            return SpecifierSet(spec).contains(Version(version), prereleases=True)
        except (InvalidVersion, ValueError):
            pass
    # Simple fallback (no 'packaging' library): numeric comparison of release parts.
    have = _release(version)
    checks = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
              "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for op, wanted in re.findall(r"(>=|<=|==|!=|>|<)\s*([\w.+-]+)", spec):
        want = _release(wanted)
        n = max(len(have), len(want))
        if not checks[op](have + (0,) * (n - len(have)), want + (0,) * (n - len(want))):
            return False
    return True


def installed_version(requirement: str) -> str | None:
    """Installed version of the distribution of ``requirement`` (None if not installed)."""
    try:
        return importlib.metadata.version(distribution_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: str) -> bool:
    """Installed at a version that meets ``requirement``.

    A package that imports but has no installation metadata (so no version to check) counts
    as satisfied.
    """
    version = installed_version(requirement)
    if version is None:
        return is_importable(requirement)
    return version_satisfies(version, requirement)


def missing_requirements(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed at a version that does not fit."""
    return [r for r in requirements if not is_satisfied(r)]


def _slicer_packaging():
    """``slicer.packaging`` (Slicer >= 5.12), imported explicitly; None where it does not exist."""
    try:
        import slicer.packaging as packaging
    except ImportError:
        return None
    return packaging if hasattr(packaging, "pip_ensure") else None


def _testing_mode() -> bool:
    """True in ``Slicer --testing``, where nothing may be installed (dialogs answer themselves)."""
    try:
        import slicer

        return bool(slicer.app.testingEnabled())
    except (ImportError, AttributeError):
        return False


def ensure_torch(confirm: Callable[[str], bool], requester: str = "SynthSegMONAI") -> None:
    """Install PyTorch via PyTorchUtils if it is missing or too old (asks through ``confirm``)."""
    if is_satisfied(TORCH_REQUIREMENT):
        return
    try:
        import PyTorchUtils  # the PyTorch extension's module
    except ImportError as e:
        raise DependencyError(pytorch_extension_missing(requester)) from e
    if _testing_mode():
        raise DependencyError(_("PyTorch is not installed (testing mode: nothing is installed)."))
    if not confirm(_("{requester} needs PyTorch, which is not installed yet (or is too old). Install it "
                     "now? This downloads several GB and can take a few minutes.").format(requester=requester)):
        raise DependencyError(_("PyTorch is required: nothing was installed."))
    try:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
    except Exception as e:
        raise DependencyError(_("PyTorch could not be installed: {error}").format(error=e)) from e
    if torch is None:
        raise DependencyError(_("PyTorch could not be installed; see the Python console for details."))


def ensure_packages(requirements: list[str], confirm: Callable[[str], bool],
                    requester: str = "SynthSegMONAI") -> None:
    """Install the requirements (torch excluded) that are missing or too old, after asking."""
    wanted = [r for r in requirements if distribution_name(r).lower() != "torch"]
    missing = missing_requirements(wanted)
    if not missing:
        return
    packaging = _slicer_packaging()
    already_imported: list[str] = []
    try:
        if packaging is not None:
            # Slicer >= 5.12: asks the user (raises RuntimeError if declined), installs with progress.
            packaging.pip_ensure(missing, requester=requester)
        else:
            import slicer.util

            if _testing_mode():
                raise DependencyError(_("Python packages missing (testing mode: nothing is installed): "
                                        "{packages}").format(packages=", ".join(missing)))
            if not confirm(_("{requester} needs these Python packages, which are missing or too old:\n"
                             "{packages}\n\nInstall them now?").format(requester=requester,
                                                                       packages="\n".join(missing))):
                raise DependencyError(_("Required Python packages are missing: nothing was installed."))
            already_imported = [r for r in missing if import_name(r) in sys.modules]
            slicer.util.pip_install(missing)
    except DependencyError:
        raise
    except RuntimeError as e:  # slicer.packaging: the user declined
        raise DependencyError(_("Required Python packages are missing: nothing was installed ({error}).")
                              .format(error=e)) from e
    except Exception as e:  # pip failed (CalledProcessError), no network, ...
        raise DependencyError(_("Python packages could not be installed: {error}").format(error=e)) from e
    still_missing = missing_requirements(wanted)
    if still_missing:
        raise DependencyError(_("These Python packages are still missing or too old: {packages}").format(
            packages=", ".join(still_missing)))
    if already_imported:  # slicer.packaging asks about this itself
        raise DependencyError(_("Updated Python packages that were already loaded: {packages}. Restart "
                                "Slicer to use them.").format(packages=", ".join(already_imported)))


def ensure_all(module_dir: str | Path, confirm: Callable[[str], bool],
               extra_files: tuple[str, ...] = (), requester: str = "SynthSegMONAI") -> None:
    """PyTorch first (through its extension), then the packages of the requirements files."""
    ensure_torch(confirm, requester)
    requirements = []
    for name in (REQUIREMENTS, *extra_files):
        requirements += read_requirements(requirements_file(module_dir, name))
    ensure_packages(requirements, confirm, requester)
