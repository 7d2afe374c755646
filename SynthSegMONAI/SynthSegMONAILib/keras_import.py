"""Convert official SynthSeg Keras HDF5 weight files into SynthSeg-MONAI model files."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import ModelFileError
from .labels import synthseg_labels
from .model_file import ModelInfo, save_model
from .network import SynthSegUNet, UNetConfig

_CONV = re.compile(r"^unet_conv_(downarm|uparm)_(\d+)_(\d+)$")
_BN = re.compile(r"^unet_bn_(down|up)_(\d+)$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def read_keras_weights(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight name -> array} for every layer listed in ``layer_names``.

    Accepts weights-only saves and full-model saves (weights under ``model_weights/``).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Keras file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ModelFileError(f"{path} is not an HDF5 (Keras .h5) file: {e}") from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise ModelFileError(f"{path} is an HDF5 file without Keras weights (no layer_names)")
        layers = {}
        for lname in (_decode(n) for n in root.attrs["layer_names"]):
            group = root[lname]
            names = [_decode(n) for n in group.attrs.get("weight_names", [])]
            weights = {}
            for wname in names:
                short = wname.split("/")[-1].split(":")[0]
                weights[short] = np.asarray(group[wname])
            if weights:
                layers[lname] = weights
    return layers


def _config_from_layers(layers: dict[str, dict[str, np.ndarray]], path: Path) -> UNetConfig:
    down = sorted({int(m.group(2)) for n in layers if (m := _CONV.match(n)) and m.group(1) == "downarm"})
    convs = sorted({int(m.group(3)) for n in layers if (m := _CONV.match(n))})
    if not down or "unet_likelihood" not in layers:
        raise ModelFileError(f"{path} is not a SynthSeg segmentation U-Net (layers "
                             "unet_conv_downarm_* and unet_likelihood not found); QC, "
                             "parcellation and denoiser networks are not supported")
    first = layers["unet_conv_downarm_0_0"]["kernel"]
    head = layers["unet_likelihood"]["kernel"]
    second = layers.get("unet_conv_downarm_1_0", {}).get("kernel")
    mult = second.shape[-1] // first.shape[-1] if second is not None else 2
    return UNetConfig(in_channels=first.shape[3], out_channels=head.shape[-1],
                      levels=len(down), features=first.shape[-1], feature_multiplier=mult,
                      convs_per_level=len(convs), kernel_size=first.shape[0])


def keras_to_state_dict(layers: dict[str, dict[str, np.ndarray]], config: UNetConfig
                        ) -> dict[str, torch.Tensor]:
    """Map Keras layer weights onto :class:`SynthSegUNet` parameter names."""
    levels = config.levels
    state: dict[str, torch.Tensor] = {}

    def module_prefix(arm: str, index: int) -> str:
        # encoder levels are numbered 0..levels-1; decoder steps continue from `levels`,
        # the first one working at level levels-2.
        if arm in ("downarm", "down"):
            return f"encoder.{index}"
        step = index - levels if arm == "uparm" else index
        return f"decoder.{levels - 2 - step}"

    for lname, w in layers.items():
        if (m := _CONV.match(lname)):
            p = f"{module_prefix(m.group(1), int(m.group(2)))}.convs.{int(m.group(3))}.conv"
            state[f"{p}.weight"] = torch.from_numpy(np.ascontiguousarray(
                np.transpose(w["kernel"], (4, 3, 0, 1, 2))))
            state[f"{p}.bias"] = torch.from_numpy(w["bias"])
        elif (m := _BN.match(lname)):
            p = f"{module_prefix(m.group(1), int(m.group(2)))}.bn"
            state[f"{p}.weight"] = torch.from_numpy(w["gamma"])
            state[f"{p}.bias"] = torch.from_numpy(w["beta"])
            state[f"{p}.running_mean"] = torch.from_numpy(w["moving_mean"])
            state[f"{p}.running_var"] = torch.from_numpy(w["moving_variance"])
        elif lname == "unet_likelihood":
            state["head.weight"] = torch.from_numpy(np.ascontiguousarray(
                np.transpose(w["kernel"], (4, 3, 0, 1, 2))))
            state["head.bias"] = torch.from_numpy(w["bias"])
    return {k: v.to(torch.float32) for k, v in state.items()}


def load_keras_model(path: str | os.PathLike) -> tuple[SynthSegUNet, UNetConfig]:
    """Build a :class:`SynthSegUNet` holding the weights of a Keras SynthSeg file."""
    path = Path(path)
    layers = read_keras_weights(path)
    config = _config_from_layers(layers, path)
    model = SynthSegUNet(config)
    state = keras_to_state_dict(layers, config)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFileError(f"{path}: weights missing for {missing[:5]}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ModelFileError(f"{path}: {k} has shape {tuple(state[k].shape)}, "
                                 f"expected {tuple(v.shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval(), config


def import_keras(path: str | os.PathLike, output: str | os.PathLike,
                 labels: list[int] | None = None, name: str | None = None) -> Path:
    """Convert a SynthSeg Keras ``.h5`` file into a model file; returns the output path.

    ``labels`` defaults to SynthSeg 2.0's 33 labels or 1.0's 32, from the output count.
    """
    path = Path(path)
    model, config = load_keras_model(path)
    version = ""
    if labels is None:
        for v in ("2.0", "1.0"):
            if len(synthseg_labels(v)) == config.out_channels:
                labels, version = synthseg_labels(v), v
        if labels is None:
            raise ModelFileError(f"{path}: {config.out_channels} outputs match no SynthSeg "
                                 "version; give the label list explicitly")
    info = ModelInfo(
        network=config,
        labels=list(labels),
        name=name or path.stem,
        description=f"SynthSeg {version or 'segmentation'} network imported from {path.name}",
        synthseg_version=version,
        provenance={"origin": "keras-import", "source_file": path.name,
                    "source_sha256": _sha256(path)},
    )
    return save_model(output, model, info)
