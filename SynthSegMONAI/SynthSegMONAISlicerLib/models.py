"""Model choice for the module: list the registered models, add a file, import a .h5.

Added and imported models go to the engine's per-user model folder, so the command line
finds them by name too. Listings and the check before a run read only a model file's header;
the engine verifies every tensor and the checksum once, when it loads the model. Everything
goes through the engine's public API, whose names are imported on first use: reading a model
file imports PyTorch, finding one does not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import SynthSegMONAILib as engine

from .errors import SegmentationError, engine_errors


def user_model_folder() -> Path:
    """The per-user model folder (``$SYNTHSEG_MONAI_HOME/models``); may not exist yet."""
    return engine.user_model_dir()


def list_models() -> list[tuple[str, Path]]:
    """(name, path) of every registered model, in the engine's search order."""
    return [(m.name, m.path) for m in engine.available_models()]


def resolve_model(model: str):
    """Path and header info of the model to run (name, path or '' for the default).

    Raises :class:`SegmentationError` when it cannot be found or is not a usable model file.
    """
    with engine_errors():
        path = engine.resolve_model(model or None)
        return path, engine.read_model_header(path)


def model_summary(path: str | Path) -> str:
    """One line describing a model file (raises SegmentationError if it is not a model)."""
    with engine_errors():
        info = engine.read_model_header(Path(path))
    version = f"SynthSeg {info.synthseg_version}, " if info.synthseg_version else ""
    text = f"{info.name}: {version}{len(info.labels) - 1} structures"
    return f"{text}. {info.description}" if info.description else text


def _model_name(path: Path) -> str:
    suffix = engine.MODEL_SUFFIX
    return path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem


def _user_model_path(name: str) -> Path:
    return user_model_folder() / f"{name}{engine.MODEL_SUFFIX}"


def add_model_file(path: str | Path, overwrite: bool = False) -> str:
    """Verify that ``path`` is a model (every tensor and the checksum: it is copied once, then
    trusted by name) and copy it to the user model folder; returns its name."""
    path = Path(path)
    with engine_errors():
        engine.read_model_info(path)
    name = _model_name(path)
    target = _user_model_path(name)
    if target.exists() and target.resolve() != path.resolve() and not overwrite:
        raise SegmentationError(f"a model named '{name}' already exists in {target.parent}; "
                                "rename the file or allow overwriting")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != path.resolve():
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
    return name


def import_keras_model(h5_path: str | Path, name: str | None = None, overwrite: bool = False) -> str:
    """Convert FreeSurfer's SynthSeg ``.h5`` into the user model folder; returns the model name."""
    h5_path = Path(h5_path)
    name = name or h5_path.stem
    target = _user_model_path(name)
    if target.exists() and not overwrite:
        raise SegmentationError(f"a model named '{name}' already exists in {target.parent}")
    try:
        with engine_errors():
            engine.import_keras(h5_path, target, name=name)
    except (OSError, KeyError, ValueError) as e:
        raise SegmentationError(f"{h5_path.name} could not be converted: {e}") from e
    return name
