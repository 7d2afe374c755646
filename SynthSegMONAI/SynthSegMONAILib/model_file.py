"""Model files: one self-describing, checksummed ``.safetensors`` file per model.

The safetensors header metadata (strings only) holds:

- ``format`` = ``synthseg-monai-model`` and ``format_version``
- ``architecture`` (``synthseg-unet``) and ``network`` (JSON of :class:`UNetConfig`)
- ``labels``: JSON list of output label values, one per output channel
- ``preprocessing``: JSON of what inference must do to an image before the network
- ``name``, ``description``, ``synthseg_version`` (``1.0``/``2.0`` or empty)
- ``provenance``: JSON (origin, source file and its SHA-256, training steps, scores, ...)
- ``checksum``: SHA-256 over the metadata above and every tensor (name, dtype, shape, bytes)

Loading never unpickles anything, checks every tensor name and shape against the
architecture, and refuses a file whose checksum does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .labels import check_label_list
from .network import SynthSegUNet, UNetConfig

FORMAT_NAME = "synthseg-monai-model"
FORMAT_VERSION = 1
ARCHITECTURE = "synthseg-unet"

DEFAULT_PREPROCESSING = {
    "target_resolution_mm": 1.0,
    "resample_tolerance_mm": 0.05,
    "intensity_percentiles": [0.5, 99.5],
    "min_pad": 128,
    "posterior_smoothing_sigma": 0.5,
    "flip_averaging": True,
    "mask_threshold": 0.25,
    "fast_threshold": 0.2,
}


@dataclass
class ModelInfo:
    """Everything a model file says about itself."""

    network: UNetConfig
    labels: list[int]
    name: str = "model"
    description: str = ""
    synthseg_version: str = ""
    preprocessing: dict = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    provenance: dict = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "architecture": ARCHITECTURE,
            "network": json.dumps(self.network.to_dict(), sort_keys=True),
            "labels": json.dumps([int(x) for x in self.labels]),
            "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
            "name": self.name,
            "description": self.description,
            "synthseg_version": self.synthseg_version,
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }


def _checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"},
                        sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_tensors(model: SynthSegUNet, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors a model file stores: weights and BatchNorm statistics, no counters."""
    # clone with standard strides: a channels-last model's 1x1x1 kernels count as contiguous with
    # strides that safetensors and byte views cannot take
    return {
        k: v.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def save_model(path: str | os.PathLike, model: SynthSegUNet, info: ModelInfo,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` with ``info`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    if model.config != info.network:
        raise ValueError("the model's configuration differs from info.network")
    check_label_list(info.labels)
    if len(info.labels) != info.network.out_channels:
        raise ValueError("one output label per output channel is required")
    tensors = model_tensors(model, dtype)
    meta = info.metadata()
    meta["checksum"] = _checksum(meta, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a SynthSeg-MONAI model file (not safetensors: {e})") from e
    return meta, tensors


def _info_from_metadata(path: Path, meta: dict[str, str]) -> ModelInfo:
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is a safetensors file but not a SynthSeg-MONAI model "
                             "(no 'format: synthseg-monai-model' in its metadata)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError as e:
        raise ModelFileError(f"{path}: unreadable format_version") from e
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path} uses model format {version}; this version of "
                             f"synthseg-monai reads up to {FORMAT_VERSION}: please upgrade")
    if meta.get("architecture") != ARCHITECTURE:
        raise ModelFileError(f"{path}: unknown architecture {meta.get('architecture')!r}")
    try:
        network = UNetConfig.from_dict(json.loads(meta["network"]))
        labels = [int(x) for x in json.loads(meta["labels"])]
        preprocessing = dict(DEFAULT_PREPROCESSING, **json.loads(meta.get("preprocessing", "{}")))
        provenance = json.loads(meta.get("provenance", "{}"))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: damaged model metadata ({e})") from e
    try:
        check_label_list(labels)
    except ValueError as e:
        raise ModelFileError(f"{path}: inconsistent labels: {e}") from e
    if len(labels) != network.out_channels:
        raise ModelFileError(f"{path}: inconsistent labels: {len(labels)} labels for "
                             f"{network.out_channels} output channels")
    return ModelInfo(network=network, labels=labels, name=meta.get("name", path.stem),
                     description=meta.get("description", ""),
                     synthseg_version=meta.get("synthseg_version", ""),
                     preprocessing=preprocessing, provenance=provenance)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple[SynthSegUNet, ModelInfo]:
    """Load and verify a model file; returns the network in eval mode and its info."""
    path = Path(path)
    meta, tensors = _read(path)
    info = _info_from_metadata(path, meta)
    if meta.get("checksum") != _checksum(meta, tensors):
        raise ModelFileError(f"{path}: checksum mismatch: the file has been altered or damaged")
    model = SynthSegUNet(info.network)
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{path}: tensors do not match the architecture "
                             f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise ModelFileError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                                 f"expected {tuple(t.shape)}")
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), info


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """Metadata of a model file, verified like :func:`load_model` but without building it."""
    path = Path(path)
    meta, tensors = _read(path)
    info = _info_from_metadata(path, meta)
    if meta.get("checksum") != _checksum(meta, tensors):
        raise ModelFileError(f"{path}: checksum mismatch: the file has been altered or damaged")
    return info
