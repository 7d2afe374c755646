"""Model choice for the module: list the registered models, add a file, import a .h5.

Added and imported models go to the engine's per-user model folder, so the command line
finds them by name too. The engine is imported lazily (it needs PyTorch).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .segment_job import SegmentationError

MODEL_SUFFIX = ".safetensors"


def list_models() -> list[tuple[str, Path]]:
    """(name, path) of every registered model, in the engine's search order."""
    from SynthSegMONAILib import model_registry

    return [(m.name, m.path) for m in model_registry.available_models()]


def model_summary(path: str | Path) -> str:
    """One line describing a model file (raises SegmentationError if it is not a model)."""
    from SynthSegMONAILib import model_registry
    from SynthSegMONAILib.errors import SynthSegError

    try:
        info = model_registry.describe(Path(path))
    except SynthSegError as e:
        raise SegmentationError(str(e)) from e
    version = f"SynthSeg {info.synthseg_version}, " if info.synthseg_version else ""
    text = f"{info.name}: {version}{len(info.labels) - 1} structures"
    return f"{text}. {info.description}" if info.description else text


def add_model_file(path: str | Path, overwrite: bool = False) -> str:
    """Check that ``path`` is a model and copy it to the user model folder; returns its name."""
    from SynthSegMONAILib import model_registry

    path = Path(path)
    model_summary(path)  # raises with a clear message if it is not a model
    name = path.name[: -len(MODEL_SUFFIX)] if path.name.endswith(MODEL_SUFFIX) else path.stem
    target = model_registry.user_model_dir() / f"{name}{MODEL_SUFFIX}"
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
    from SynthSegMONAILib import model_registry
    from SynthSegMONAILib.errors import SynthSegError
    from SynthSegMONAILib.keras_import import import_keras

    h5_path = Path(h5_path)
    name = name or h5_path.stem
    target = model_registry.user_model_dir() / f"{name}{MODEL_SUFFIX}"
    if target.exists() and not overwrite:
        raise SegmentationError(f"a model named '{name}' already exists in {target.parent}")
    try:
        import_keras(h5_path, target, name=name)
    except SynthSegError as e:
        raise SegmentationError(str(e)) from e
    except (OSError, KeyError, ValueError) as e:
        raise SegmentationError(f"{h5_path.name} could not be converted: {e}") from e
    return name
