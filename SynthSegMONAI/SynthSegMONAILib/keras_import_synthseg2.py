"""Read SynthSeg 2.0's robust, parcellation and QC Keras files into PyTorch networks.

``synthseg_robust_2.0.h5`` holds three U-Nets (layer prefixes ``unet``, ``l2l``, ``unet2``),
``synthseg_parc_2.0.h5`` one (``unet_parc``) and ``synthseg_qc_2.0.h5`` the QC regressor
(``qc``). The original loads each with ``load_weights(path, by_name=True)`` into the model
``predict_synthseg.py::build_model`` builds, whose sizes are fixed in the code; here only the
layers of the network a file is for are read, and every dataset is checked (hard links only,
no virtual or external storage, floating point, exactly the shape that network needs) before
any value is read. Weights-only saves and full-model saves (``model_weights/``) are accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ModelFileError
from .keras_import import _weight_datasets, file_sha256, import_keras, open_keras_file
from .memory_estimate import check_fits
from .model_file import ModelInfo, fixed_info, save_model, weight_problem
from .network import SynthSegUNet
from .synthseg2_networks import (
    DenoiserUNet,
    QualityControlNet,
    RobustSegmenter,
    parcellation_config,
)

_BN_WEIGHTS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
               "running_var": "moving_variance"}
_UNET_KEY = re.compile(r"^(encoder|decoder)\.(\d+)\.(?:convs\.(\d+)\.conv|bn)\.(\w+)$")
_QC_KEY = re.compile(r"^levels\.(\d+)\.(conv0|conv1|expand|bn)\.(\w+)$")


def unet_keras_name(key: str, prefix: str, levels: int) -> tuple[str, str]:
    """(Keras layer, weight) of a :class:`SynthSegUNet` state-dict key, for the U-Net whose
    layers are named ``<prefix>_conv_downarm_<level>_<i>`` etc. (``ext/neuron/models.py``)."""
    if key in ("head.weight", "head.bias"):
        return f"{prefix}_likelihood", "kernel" if key == "head.weight" else "bias"
    m = _UNET_KEY.match(key)
    if m is None:
        raise KeyError(key)
    arm, level, conv, weight = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if conv is not None:
        step = level if arm == "encoder" else 2 * levels - 2 - level  # decoder steps count on from levels
        kind = "downarm" if arm == "encoder" else "uparm"
        return f"{prefix}_conv_{kind}_{step}_{conv}", "kernel" if weight == "weight" else "bias"
    bn = f"{prefix}_bn_down_{level}" if arm == "encoder" else f"{prefix}_bn_up_{levels - 2 - level}"
    return bn, _BN_WEIGHTS[weight]


def qc_keras_name(key: str) -> tuple[str, str]:
    """(Keras layer, weight) of a :class:`QualityControlNet` state-dict key."""
    if key.startswith(("final0.", "final1.")):
        layer, weight = key.split(".")
        return f"qc_final_conv_{layer[-1]}", "kernel" if weight == "weight" else "bias"
    m = _QC_KEY.match(key)
    if m is None:
        raise KeyError(key)
    level, part, weight = int(m.group(1)), m.group(2), m.group(3)
    if part == "bn":
        return f"qc_bn_down_{level}", _BN_WEIGHTS[weight]
    layer = f"qc_expand_down_merge_{level}" if part == "expand" else f"qc_conv_downarm_{level}_{part[-1]}"
    return layer, "kernel" if weight == "weight" else "bias"


def _expected(module: nn.Module, name_of) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """State-dict key -> (Keras layer, weight, Keras shape) for every tensor Keras stores."""
    out = {}
    for key, tensor in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        layer, weight = name_of(key)
        shape = tuple(tensor.shape)
        out[key] = (layer, weight, (*shape[2:], shape[1], shape[0]) if len(shape) == 5 else shape)
    return out


def _load_into(path: str | os.PathLike, module: nn.Module, name_of, what: str) -> nn.Module:
    """Fill ``module`` from the Keras file's layers named by ``name_of`` (all must be there)."""
    path = Path(path)
    expected = _expected(module, name_of)
    wanted = {layer for layer, _, _ in expected.values()}
    with open_keras_file(path) as f:
        layers = _weight_datasets(f, path, keep=wanted.__contains__)
        missing = sorted(wanted - set(layers))
        if missing:
            raise ModelFileError(f"{path} is not a {what} file: layers {missing[:3]} "
                                 f"({len(missing)} of {len(wanted)}) are missing")
        datasets = {}
        for key, (layer, weight, shape) in expected.items():
            ds = layers[layer].get(weight)
            if ds is None:
                raise ModelFileError(f"{path}: {layer} has no {weight} weight")
            if tuple(ds.shape) != shape:
                raise ModelFileError(f"{path}: {layer}/{weight} has shape {tuple(ds.shape)}; the {what} "
                                     f"needs {shape}")
            datasets[key] = ds
        values = sum(int(np.prod(s)) for _, _, s in expected.values())
        check_fits(20 * values, f"{path}: importing the {what} ({values:,} values)")
        state = {}
        for key, ds in datasets.items():
            array = np.asarray(ds[()], dtype=np.float32)
            if array.ndim == 5:  # Keras (kx, ky, kz, in, out) -> PyTorch (out, in, kx, ky, kz)
                array = np.ascontiguousarray(np.transpose(array, (4, 3, 0, 1, 2)))
            tensor = torch.from_numpy(array)
            problem = weight_problem(key, tensor)
            if problem:
                raise ModelFileError(f"{path}: {problem}: the Keras file is damaged")
            state[key] = tensor
    module.load_state_dict(state, strict=False)
    return module.eval()


def load_keras_robust(path: str | os.PathLike) -> RobustSegmenter:
    """The three networks of ``synthseg_robust_2.0.h5`` as a :class:`RobustSegmenter`."""
    model = RobustSegmenter()
    parts = {"segmenter.": ("unet", model.segmenter), "denoiser.": ("l2l", model.denoiser),
             "segmenter2.": ("unet2", model.segmenter2)}

    def name_of(key: str) -> tuple[str, str]:
        for start, (prefix, net) in parts.items():
            if key.startswith(start):
                return unet_keras_name(key[len(start):], prefix, net.config.levels)
        raise KeyError(key)

    return _load_into(path, model, name_of, "SynthSeg-robust 2.0 network")


def load_keras_parcellation(path: str | os.PathLike) -> SynthSegUNet:
    """The cortical parcellation U-Net of ``synthseg_parc_2.0.h5`` (layers ``unet_parc_*``)."""
    model = SynthSegUNet(parcellation_config())
    return _load_into(path, model, lambda k: unet_keras_name(k, "unet_parc", model.config.levels),
                      "SynthSeg 2.0 parcellation network")


def load_keras_qc(path: str | os.PathLike) -> QualityControlNet:
    """The QC regressor of ``synthseg_qc_2.0.h5`` (layers ``qc_*``)."""
    return _load_into(path, QualityControlNet(), qc_keras_name, "SynthSeg 2.0 QC network")


#: role -> (architecture, loader, what it is)
_KINDS = {"robust": ("synthseg-robust-2.0", load_keras_robust, "SynthSeg-robust 2.0 (three U-Nets)"),
          "parcellation": ("synthseg-parc-2.0", load_keras_parcellation, "SynthSeg 2.0 cortical parcellation"),
          "qc": ("synthseg-qc-2.0", load_keras_qc, "SynthSeg 2.0 quality control")}

#: the official files FreeSurfer 7.3+ ships in ``$FREESURFER_HOME/models``, in import order
FREESURFER_FILES = ("synthseg_2.0.h5", "synthseg_robust_2.0.h5", "synthseg_parc_2.0.h5", "synthseg_qc_2.0.h5",
                    "synthseg_1.0.h5")


def keras_network_kind(path: str | os.PathLike) -> str:
    """Which SynthSeg network a Keras file holds, from its layer names alone: ``robust``
    (``unet2_*``/``l2l_*``), ``parcellation`` (``unet_parc_*``), ``qc`` (``qc_*``) or
    ``segmentation`` (anything else: the plain U-Net's ``unet_*``)."""
    path = Path(path)
    with open_keras_file(path) as f:
        names = set(_weight_datasets(f, path, keep=lambda name: True))
    if any(n.startswith(("unet2_", "l2l_")) for n in names):
        return "robust"
    if any(n.startswith("unet_parc_") for n in names):
        return "parcellation"
    if any(n.startswith("qc_") for n in names):
        return "qc"
    return "segmentation"


def import_keras_any(path: str | os.PathLike, output: str | os.PathLike, name: str | None = None) -> Path:
    """Convert any official SynthSeg Keras file (segmentation, robust, parcellation or QC,
    detected by :func:`keras_network_kind`) into a model file; returns the output path."""
    path = Path(path)
    kind = keras_network_kind(path)
    if kind == "segmentation":
        return import_keras(path, output, name=name)
    architecture, loader, what = _KINDS[kind]
    model = loader(path)
    network, labels = fixed_info(architecture)
    info = ModelInfo(network=network, labels=labels, name=name or path.stem,
                     description=f"{what} network imported from {path.name}", synthseg_version="2.0",
                     provenance={"origin": "keras-import", "source_file": path.name,
                                 "source_sha256": file_sha256(path)},
                     architecture=architecture)
    return save_model(output, model, info)


def freesurfer_models_folder(folder: str | os.PathLike) -> Path:
    """``FOLDER/models`` when ``folder`` is a FreeSurfer home, else ``folder`` itself."""
    folder = Path(folder).expanduser()
    return folder / "models" if (folder / "models").is_dir() else folder


def import_freesurfer(folder: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
    """Import every official SynthSeg file of :data:`FREESURFER_FILES` found in a FreeSurfer
    models folder (or home) as ``<output_dir>/<name>.safetensors``; returns the files written."""
    source = freesurfer_models_folder(folder)
    found = [source / n for n in FREESURFER_FILES if (source / n).is_file()]
    if not found:
        raise ModelFileError(f"{source}: none of {', '.join(FREESURFER_FILES)} is there (FreeSurfer 7.3 or "
                             "later ships them in $FREESURFER_HOME/models)")
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return [import_keras_any(p, out / (p.name[: -len(".h5")] + ".safetensors")) for p in found]


__all__ = ["DenoiserUNet", "FREESURFER_FILES", "import_freesurfer", "import_keras_any", "keras_network_kind",
           "load_keras_parcellation", "load_keras_qc", "load_keras_robust", "qc_keras_name", "unet_keras_name"]
