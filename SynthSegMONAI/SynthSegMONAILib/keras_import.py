"""Convert official SynthSeg Keras HDF5 weight files into SynthSeg-MONAI model files.

A ``.h5`` file may come from anywhere: only hard links are followed (no external links,
virtual datasets or external raw storage, which would pull in other files' bytes), and every
dataset's type and shape is checked against the network the file describes before any is read.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

from .errors import ModelFileError
from .labels import synthseg_labels
from .memory_estimate import check_fits
from .model_file import ModelInfo, save_model, weight_problem
from .network import SynthSegUNet, UNetConfig

_CONV = re.compile(r"^unet_conv_(downarm|uparm)_(\d+)_(\d+)$")
_BN = re.compile(r"^unet_bn_(down|up)_(\d+)$")


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


_BN_WEIGHTS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
               "moving_variance": "running_var"}


def _state_name(layer: str, weight: str, levels: int) -> str | None:
    """The :class:`SynthSegUNet` tensor a Keras weight maps to (None: not a SynthSeg weight).

    Encoder levels are numbered 0..levels-1; Keras numbers the decoder's convolutions on from
    ``levels`` (the first working at level levels-2) and its BatchNorms from 0.
    """
    if (m := _CONV.match(layer)):
        index = int(m.group(2))
        level = index if m.group(1) == "downarm" else levels - 2 - (index - levels)
        arm = "encoder" if m.group(1) == "downarm" else "decoder"
        if weight in ("kernel", "bias"):
            return f"{arm}.{level}.convs.{int(m.group(3))}.conv.{'weight' if weight == 'kernel' else 'bias'}"
    elif (m := _BN.match(layer)):
        index = int(m.group(2))
        prefix = f"encoder.{index}" if m.group(1) == "down" else f"decoder.{levels - 2 - index}"
        if weight in _BN_WEIGHTS:
            return f"{prefix}.bn.{_BN_WEIGHTS[weight]}"
    elif layer == "unet_likelihood" and weight in ("kernel", "bias"):
        return "head.weight" if weight == "kernel" else "head.bias"
    return None


def _keras_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Keras layout of a PyTorch tensor shape: kernels are (k, k, k, in, out)."""
    return (*shape[2:], shape[1], shape[0]) if len(shape) == 5 else shape


def _link_target(group, name: str, path: Path):
    """The object at ``name`` below ``group``, through hard links only."""
    import h5py

    obj = group
    for part in (p for p in name.split("/") if p):
        if not isinstance(obj, h5py.Group):
            raise ModelFileError(f"{path}: {obj.name} is not a group")
        link = obj.get(part, getlink=True)
        if link is None:
            raise ModelFileError(f"{path}: {obj.name.rstrip('/')}/{part} is missing")
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise ModelFileError(f"{path}: {obj.name.rstrip('/')}/{part} is {kind}: refused (an official "
                                 "SynthSeg weight file has none; it would read another object or file)")
        obj = obj[part]
    return obj


def open_keras_file(path: Path):
    """The HDF5 file at ``path``, open for reading; :class:`ModelFileError` if it is missing or not HDF5."""
    import h5py

    if not path.is_file():
        raise ModelFileError(f"Keras file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ModelFileError(f"{path} is not an HDF5 (Keras .h5) file: {e}") from e


def _is_segmentation_layer(name: str) -> bool:
    return bool(_CONV.match(name) or _BN.match(name) or name == "unet_likelihood")


def _weight_datasets(f, path: Path, keep=_is_segmentation_layer) -> dict[str, dict[str, object]]:
    """Layer name -> {weight name -> h5py.Dataset} of the layers ``keep(name)`` selects (by
    default the segmentation U-Net's); nothing is read yet."""
    import h5py

    root = _link_target(f, "model_weights", path) if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise ModelFileError(f"{path} is an HDF5 file without Keras weights (no layer_names)")
    layers: dict[str, dict[str, object]] = {}
    for lname in (_decode(n) for n in np.atleast_1d(root.attrs["layer_names"])):
        if not keep(lname):
            continue  # layers without weights (input, pooling, ...) are never opened
        if lname not in root:
            raise ModelFileError(f"{path}: layer {lname} is listed in layer_names but its group is missing")
        group = _link_target(root, lname, path)
        if not isinstance(group, h5py.Group):
            raise ModelFileError(f"{path}: layer {lname} is not a group")
        weights = {}
        for wname in (_decode(n) for n in np.atleast_1d(group.attrs.get("weight_names", []))):
            ds = _link_target(group, wname, path)
            if not isinstance(ds, h5py.Dataset):
                raise ModelFileError(f"{path}: weight {wname} is not a dataset")
            if ds.is_virtual or ds.external:
                kind = "virtual dataset" if ds.is_virtual else "dataset with external storage"
                raise ModelFileError(f"{path}: weight {wname} is a {kind}: refused (an official SynthSeg "
                                     "weight file has none; its values would come from other files)")
            if ds.dtype.kind != "f":
                raise ModelFileError(f"{path}: weight {wname} holds {ds.dtype} values, not floating-point "
                                     "weights")
            weights[wname.split("/")[-1].split(":")[0]] = ds
        if weights:
            layers[lname] = weights
    return layers


def _config_from_layers(layers: dict[str, dict[str, object]], path: Path) -> UNetConfig:
    """The network's size, from the shapes of a few datasets (never their values)."""
    down = sorted({int(m.group(2)) for n in layers if (m := _CONV.match(n)) and m.group(1) == "downarm"})
    convs = sorted({int(m.group(3)) for n in layers if (m := _CONV.match(n))})
    if not down or "unet_likelihood" not in layers:
        raise ModelFileError(f"{path} is not a SynthSeg segmentation U-Net (layers "
                             "unet_conv_downarm_* and unet_likelihood not found); QC, "
                             "parcellation and denoiser networks are not supported")

    def kernel_shape(layer: str) -> tuple[int, ...] | None:
        ds = layers.get(layer, {}).get("kernel")
        if ds is None:
            return None
        if len(ds.shape) != 5:
            raise ModelFileError(f"{path}: {layer}/kernel has shape {ds.shape} (rank {len(ds.shape)}); "
                                 "a 3D convolution kernel has rank 5")
        return tuple(ds.shape)

    first, head = kernel_shape("unet_conv_downarm_0_0"), kernel_shape("unet_likelihood")
    if first is None or head is None:
        raise ModelFileError(f"{path}: kernel of unet_conv_downarm_0_0 or unet_likelihood missing")
    second = kernel_shape("unet_conv_downarm_1_0")
    mult = second[-1] // first[-1] if second is not None and first[-1] else 2
    config = UNetConfig(in_channels=first[3], out_channels=head[-1], levels=len(down), features=first[-1],
                        feature_multiplier=mult, convs_per_level=len(convs), kernel_size=first[0])
    try:
        config.check_limits()
    except ValueError as e:
        raise ModelFileError(f"{path}: unsupported network: {e}") from e
    return config


def read_keras_weights(path: str | os.PathLike) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """The network's configuration and its state dict from a Keras SynthSeg file.

    Accepts weights-only saves and full-model saves (weights under ``model_weights/``). Every
    dataset is checked (hard links only, no virtual or external storage, floating point, the
    shape the configuration implies) before any is read.
    """

    path = Path(path)
    with open_keras_file(path) as f:
        layers = _weight_datasets(f, path)
        config = _config_from_layers(layers, path)
        expected = config.tensor_shapes()
        found: dict[str, object] = {}
        for lname, weights in layers.items():
            for wname, ds in weights.items():
                name = _state_name(lname, wname, config.levels)
                if name is None or name not in expected:
                    raise ModelFileError(f"{path}: unexpected weight {lname}/{wname} for a "
                                         f"{config.levels}-level network")
                want = _keras_shape(expected[name])
                if tuple(ds.shape) != want:
                    raise ModelFileError(f"{path}: {lname}/{wname} has shape {tuple(ds.shape)}, "
                                         f"expected {want}")
                found[name] = ds
        missing = sorted(set(expected) - set(found))
        if missing:
            raise ModelFileError(f"{path}: weights missing for {missing[:5]} (a layer without its bias, "
                                 "BatchNorm statistics or group)")
        values = config.parameter_count()
        check_fits(20 * values, f"{path}: importing this network ({values:,} values)")
        state = {}
        for name, ds in found.items():
            array = np.asarray(ds[()], dtype=np.float32)
            if array.ndim == 5:
                array = np.ascontiguousarray(np.transpose(array, (4, 3, 0, 1, 2)))
            tensor = torch.from_numpy(array)
            problem = weight_problem(name, tensor)
            if problem:
                raise ModelFileError(f"{path}: {problem}: the Keras file is damaged")
            state[name] = tensor
    return config, state


def load_keras_model(path: str | os.PathLike) -> tuple[SynthSegUNet, UNetConfig]:
    """Build a :class:`SynthSegUNet` holding the weights of a Keras SynthSeg file."""
    config, state = read_keras_weights(path)
    model = SynthSegUNet(config)  # built only once every dataset matched the configuration
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
                    "source_sha256": file_sha256(path)},
    )
    return save_model(output, model, info)
