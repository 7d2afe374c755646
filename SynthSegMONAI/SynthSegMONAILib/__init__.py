"""SynthSeg-MONAI engine: SynthSeg brain MRI segmentation in PyTorch, free of Slicer and Qt.

The public API is importable from the package itself (``from SynthSegMONAILib import
Segmenter``). Names are imported on first use, so ``import SynthSegMONAILib`` stays light: the
label table, the model registry, the errors and the line protocol need no PyTorch; segmenting,
loading or writing a model imports it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    # errors (standard library only)
    "SynthSegError": "errors",
    "InputImageError": "errors",
    "ModelFileError": "errors",
    "OptionError": "errors",
    "OutputPathError": "errors",
    "ResourceLimitError": "errors",
    # the label table (numpy)
    "Structure": "labels",
    "all_structures": "labels",
    "csv_names": "labels",
    "structure": "labels",
    "synthseg_labels": "labels",
    # where model files are found (standard library only)
    "MODEL_SUFFIX": "model_registry",
    "RegisteredModel": "model_registry",
    "available_models": "model_registry",
    "model_search_paths": "model_registry",
    "resolve_model": "model_registry",
    "user_model_dir": "model_registry",
    # model files (PyTorch)
    "ModelInfo": "model_file",
    "load_model": "model_file",
    "read_model_header": "model_file",
    "read_model_info": "model_file",
    "save_model": "model_file",
    # the network (PyTorch)
    "SynthSegUNet": "network",
    "UNetConfig": "network",
    # segmentation (PyTorch)
    "Outputs": "pipeline",
    "Result": "pipeline",
    "Segmenter": "pipeline",
    # conversions
    "export_bundle": "bundle",
    "import_keras": "keras_import",
    # the lines the command line prints for a parent process (standard library only)
    "ResultLine": "protocol",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    """Import a public name's submodule on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

