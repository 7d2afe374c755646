"""Where model files are found: a folder list searched by name, and the default model.

Search order: ``$SYNTHSEG_MONAI_MODELS`` (``os.pathsep``-separated folders), the user's
model folder (``~/.synthseg-monai/models``, where the Slicer module copies added and
imported models), then the models shipped with the package (``Resources/Models``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError
from .resource_files import resource_folder

MODEL_SUFFIX = ".safetensors"
DEFAULT_MODEL_NAME = "synthseg_monai_default"

HOW_TO_GET_A_MODEL = (
    "No model file was given and no default model is installed. Either convert the official "
    "SynthSeg weights that FreeSurfer 7.3+ ships:\n"
    "  synthseg-monai import-keras $FREESURFER_HOME/models/synthseg_2.0.h5 "
    "-o ~/.synthseg-monai/models/synthseg_2.0.safetensors\n"
    "or train one (synthseg-monai train ...), then pass --model PATH or --model NAME."
)


@dataclass(frozen=True)
class RegisteredModel:
    """A model file found in one of the model folders."""

    name: str
    path: Path


def user_model_dir() -> Path:
    """The per-user model folder (created on demand by callers that write to it)."""
    return Path(os.environ.get("SYNTHSEG_MONAI_HOME", Path.home() / ".synthseg-monai")) / "models"


def shipped_model_dir() -> Path:
    """Models shipped with the package or the extension source tree."""
    return resource_folder("Models", Path(__file__).parent)


def model_search_paths() -> list[Path]:
    """Folders searched for models, in priority order."""
    env = [Path(p) for p in os.environ.get("SYNTHSEG_MONAI_MODELS", "").split(os.pathsep) if p]
    return [*env, user_model_dir(), shipped_model_dir()]


def available_models() -> list[RegisteredModel]:
    """Every model file in the search folders; the first of each name wins."""
    seen: dict[str, RegisteredModel] = {}
    for folder in model_search_paths():
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
                name = path.name[: -len(MODEL_SUFFIX)]
                seen.setdefault(name, RegisteredModel(name, path))
    return list(seen.values())


def resolve_model(model: str | os.PathLike | None = None, v1: bool = False) -> Path:
    """Path of the model to use: a file path, a registered name, or the default.

    With ``v1`` and no explicit model, the SynthSeg 1.0 model (``synthseg_1.0``) is chosen.
    """
    if model:
        return _resolve_named(str(model))
    wanted = ["synthseg_1.0"] if v1 else [DEFAULT_MODEL_NAME, "synthseg_2.0"]
    models = {m.name: m.path for m in available_models()}
    for name in wanted:
        if name in models:
            return models[name]
    if v1:
        raise ModelFileError("--v1 needs the SynthSeg 1.0 model: convert synthseg_1.0.h5 with "
                             "synthseg-monai import-keras ... -o ~/.synthseg-monai/models/"
                             "synthseg_1.0.safetensors, or pass --model")
    raise ModelFileError(HOW_TO_GET_A_MODEL)


KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def _keras_hint(path: Path) -> str:
    return (f"{path} is a Keras file: convert it once with\n"
            f"  synthseg-monai import-keras {path} -o {user_model_dir() / (path.stem + MODEL_SUFFIX)}\n"
            f"then pass --model {path.stem}")


def _resolve_named(model: str) -> Path:
    """An existing file first, then an installed model by name (with or without ``.safetensors``)."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() in KERAS_SUFFIXES:
            raise ModelFileError(_keras_hint(path))
        return path
    if path.exists():
        raise ModelFileError(f"--model {model}: not a file")
    name = path.name[: -len(MODEL_SUFFIX)] if path.name.endswith(MODEL_SUFFIX) else path.name
    if path.name == model or path.name == str(model).rstrip("/"):  # a bare name, not a path
        for m in available_models():
            if m.name == name:
                return m.path
    if path.suffix.lower() in KERAS_SUFFIXES:
        raise ModelFileError(f"model file not found: {path} (and {path.name} is a Keras file: "
                             "convert it with synthseg-monai import-keras first)")
    raise ModelFileError(f"model not found: {model!r} is neither a file nor an installed model.\n"
                         f"{installed_models_text()}\n{HOW_TO_GET_A_MODEL_SHORT}")


HOW_TO_GET_A_MODEL_SHORT = (
    "To install one, convert the official SynthSeg weights that FreeSurfer 7.3+ ships:\n"
    "  synthseg-monai import-keras $FREESURFER_HOME/models/synthseg_2.0.h5 "
    "-o ~/.synthseg-monai/models/synthseg_2.0.safetensors"
)


def installed_models_text() -> str:
    """One line: the installed model names, or that there are none, and where they were looked for."""
    names = [m.name for m in available_models()]
    where = ", ".join(str(p) for p in model_search_paths())
    if not names:
        return f"No model is installed (searched: {where})."
    return f"Installed models: {', '.join(names)} (in {where})."


def describe(path: Path):
    """The verified metadata of a model file (a ``ModelInfo``; imports torch on first use)."""
    from .model_file import read_model_info

    return read_model_info(path)
