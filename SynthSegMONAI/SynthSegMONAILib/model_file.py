"""Model files: one self-describing, checksummed ``.safetensors`` file per model.

The safetensors header metadata (strings only) holds:

- ``format`` = ``synthseg-monai-model`` and ``format_version``
- ``architecture`` (``synthseg-unet``) and ``network`` (JSON of :class:`UNetConfig`)
- ``labels``: JSON list of output label values, one per output channel
- ``preprocessing``: JSON of what inference must do to an image before the network
- ``name``, ``description``, ``synthseg_version`` (``1.0``/``2.0`` or empty)
- ``provenance``: JSON (origin, source file and its SHA-256, training steps, scores, ...)
- ``checksum``: SHA-256 over the metadata above and every tensor (name, dtype, shape, bytes)

Loading never unpickles anything. The file comes from elsewhere, so its configuration is
checked against :data:`~.network.NETWORK_LIMITS`, its preprocessing settings against their
ranges, and every tensor's name, shape and type against the configuration from the header,
before any tensor is read or the network built; then the checksum, and NaN, infinite or
negative-variance values, refuse what was altered or damaged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .labels import check_label_list
from .memory_estimate import check_fits
from .network import SynthSegUNet, UNetConfig
from .output_files import atomic_output

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
    return _checksum_of(metadata, ((name, tensors[name]) for name in sorted(tensors)))


def _checksum_of(metadata: dict[str, str], items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The checksum of :func:`_checksum` over (name, tensor) pairs given in sorted name order."""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"},
                        sort_keys=True).encode())
    for name, t in items:
        t = t.contiguous()
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
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_declared(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and each tensor's (dtype, shape) as the file's header declares them; no tensor is read."""
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            declared = {}
            for k in f.keys():
                part = f.get_slice(k)
                declared[k] = (str(part.get_dtype()), tuple(int(n) for n in part.get_shape()))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path} is not a SynthSeg-MONAI model file (not safetensors: {e})") from e
    return meta, declared


def check_tensor_layout(path: Path, network: UNetConfig,
                        declared: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse tensors whose names, shapes or types do not match ``network`` (from the header alone)."""
    expected = network.tensor_shapes()
    missing = sorted(set(expected) - set(declared))
    extra = sorted(set(declared) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{path}: tensors do not match the architecture "
                             f"(missing: {missing[:5]}, unexpected: {extra[:5]})")
    for k, shape in expected.items():
        dtype, found = declared[k]
        if found != shape:
            raise ModelFileError(f"{path}: tensor {k} has shape {found}, expected {shape}")
        if dtype not in FLOAT_DTYPES:
            raise ModelFileError(f"{path}: tensor {k} holds {dtype} values, not floating-point weights")


def weight_problem(name: str, tensor: torch.Tensor) -> str | None:
    """What makes a tensor unusable: NaN or infinite values, negative BatchNorm variances (either
    gives all-background segmentations and NaN volumes without any error)."""
    if not bool(torch.isfinite(tensor).all()):
        return f"tensor {name} holds NaN or infinite values"
    if name.endswith("running_var") and bool((tensor < 0).any()):
        return f"tensor {name} holds negative BatchNorm variances"
    return None


def _checked_header(path: Path) -> tuple[ModelInfo, dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The header's info, metadata and declared tensors, once the metadata and the tensor layout
    have been checked (no tensor read)."""
    meta, declared = _read_declared(path)
    info = _info_from_metadata(path, meta)
    check_tensor_layout(path, info.network, declared)
    return info, meta, declared


def _verified_tensors(path: Path, keep: bool) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """Check a model file: metadata, tensor layout (before reading any tensor), memory, then every
    tensor's values and the checksum. Returns the tensors too when ``keep``."""
    info, meta, declared = _checked_header(path)
    values = info.network.parameter_count()
    check_fits(values * (16 if keep else 4), f"{path}: loading this model ({values:,} values)")
    tensors: dict[str, torch.Tensor] = {}
    problems: list[str] = []

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(declared):
                t = f.get_tensor(name)
                problem = weight_problem(name, t)
                if problem:
                    problems.append(problem)
                if keep:
                    tensors[name] = t
                yield name, t

    try:
        checksum = _checksum_of(meta, read())
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ModelFileError(f"{path}: unreadable tensor data ({e})") from e
    if meta.get("checksum") != checksum:
        raise ModelFileError(f"{path}: checksum mismatch: the file has been altered or damaged")
    if problems:
        raise ModelFileError(f"{path}: {problems[0]}: the model is damaged (a diverged training, or "
                             "weights saved so); it would segment nothing")
    return info, tensors


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
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise ModelFileError(f"{path}: damaged model metadata ({e})") from e
    try:
        network.check_limits()
    except ValueError as e:
        raise ModelFileError(f"{path}: unsupported network: {e}") from e
    check_preprocessing(path, preprocessing)
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
    info, tensors = _verified_tensors(path, keep=True)
    model = SynthSegUNet(info.network)  # built only once its configuration matches the tensors
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), info


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """Metadata of a model file, verified like :func:`load_model` (tensor names, shapes and types
    checked against the configuration from the header, then values and checksum, one tensor at
    a time) but without building the network."""
    return _verified_tensors(Path(path), keep=False)[0]


def read_model_header(path: str | os.PathLike) -> ModelInfo:
    """Metadata of a model file from its safetensors header alone, for listings and early checks.

    The metadata and the tensors' names, shapes and types are checked as :func:`load_model`
    checks them, but no tensor is read: the values and the checksum are verified once, by
    whoever loads the model (:func:`load_model`, :func:`read_model_info`).
    """
    return _checked_header(Path(path))[0]


def check_preprocessing(path: Path, pre: dict) -> None:
    """Refuse preprocessing settings that are not numbers in their ranges (they come from the file)."""
    from .memory_estimate import MAX_GRID_SIDE
    from .volume_io import MAX_VOXEL_MM, MIN_VOXEL_MM

    def number(key: str, low: float, high: float, integer: bool = False, optional: bool = False) -> None:
        v = pre.get(key)
        if optional and v is None:
            return
        ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
        if not ok or not math.isfinite(v) or not low <= v <= high:
            kind = "an integer" if integer else "a number"
            raise ModelFileError(f"{path}: preprocessing setting {key} = {v!r} is not {kind} from {low} "
                                 f"to {high}")

    number("target_resolution_mm", MIN_VOXEL_MM, MAX_VOXEL_MM)
    number("resample_tolerance_mm", 0.0, 1.0)
    number("min_pad", 1, MAX_GRID_SIDE, integer=True)
    number("posterior_smoothing_sigma", 0.0, 5.0, optional=True)
    number("mask_threshold", 0.0, 1.0)
    number("fast_threshold", 0.0, 1.0)
    if not isinstance(pre.get("flip_averaging"), bool):
        raise ModelFileError(f"{path}: preprocessing setting flip_averaging = {pre.get('flip_averaging')!r} "
                             "is not true or false")
    pct = pre.get("intensity_percentiles")
    if not (isinstance(pct, list) and len(pct) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pct)
            and 0 <= pct[0] < pct[1] <= 100):
        raise ModelFileError(f"{path}: preprocessing setting intensity_percentiles = {pct!r} is not two "
                             "increasing percentiles from 0 to 100")
