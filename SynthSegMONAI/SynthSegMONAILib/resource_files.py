"""Where the files shared between the pip package and the Slicer extension are found.

One layout, two places: an installed copy lives in ``<package>/resources/`` (the wheel and the
Slicer extension put it there), the source tree keeps the original in the repository's
top-level ``Resources/`` folder (the licence at the top itself).
"""

from __future__ import annotations

from pathlib import Path

INSTALLED_FOLDER = "resources"
SOURCE_FOLDER = "Resources"


def resource_candidates(name: str, package_dir: str | Path, source_relative: str | None = None
                        ) -> tuple[Path, Path]:
    """(installed copy, source-tree original) of ``name`` for the package in ``package_dir``.

    ``source_relative`` is the original's path relative to the repository's top folder
    (default: ``Resources/<name>``).
    """
    package_dir = Path(package_dir).resolve()
    repository = package_dir.parents[1]
    return (package_dir / INSTALLED_FOLDER / name,
            repository / (source_relative if source_relative is not None else f"{SOURCE_FOLDER}/{name}"))


def resource_path(name: str, package_dir: str | Path, source_relative: str | None = None) -> Path:
    """The shared file ``name``: the installed copy, else the source tree's; FileNotFoundError if neither."""
    for candidate in resource_candidates(name, package_dir, source_relative):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{name} not found next to {Path(package_dir).resolve()}")


def resource_folder(name: str, package_dir: str | Path) -> Path:
    """The shared folder ``name``: the installed one if it exists, else the source tree's (which may
    not exist either: callers treat a missing folder as empty)."""
    installed, source = resource_candidates(name, package_dir)
    return installed if installed.is_dir() else source
