"""Model files: one self-describing, checksummed ``.safetensors`` file per model.

The safetensors header metadata (strings only) holds:

- ``format`` = ``synthseg-monai-model`` and ``format_version`` (1; 2 for SynthSeg 2.0's robust,
  parcellation and QC networks, which older versions refuse with "please upgrade")
- ``architecture``: ``synthseg-unet`` (a segmentation U-Net of any size), or one of SynthSeg
  2.0's fixed networks (:data:`FIXED_ARCHITECTURES`: ``synthseg-robust-2.0``, the three networks
  of SynthSeg-robust; ``synthseg-parc-2.0``, the cortical parcellation U-Net; ``synthseg-qc-2.0``,
  the QC regressor), and ``network`` (JSON of :class:`UNetConfig`; ``null`` for QC)
- ``labels``: JSON list of output label values, one per output channel (empty for QC)
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
from .network_weights import UNetWeights
from .output_files import atomic_output

FORMAT_NAME = "synthseg-monai-model"
FORMAT_VERSION = 2  #: the highest version read; plain U-Nets are still written as version 1
ARCHITECTURE = "synthseg-unet"
#: SynthSeg 2.0's networks whose sizes ``predict_synthseg.py::build_model`` fixes: architecture -> role
FIXED_ARCHITECTURES = {"synthseg-robust-2.0": "robust", "synthseg-parc-2.0": "parcellation",
                       "synthseg-qc-2.0": "qc"}
#: what a model file's network is for: architecture -> role (``segmentation`` for plain U-Nets)
ROLES = {ARCHITECTURE: "segmentation", **FIXED_ARCHITECTURES}

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

    network: UNetConfig | None  #: None for the QC network (not a U-Net)
    labels: list[int]
    name: str = "model"
    description: str = ""
    synthseg_version: str = ""
    preprocessing: dict = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    provenance: dict = field(default_factory=dict)
    architecture: str = ARCHITECTURE

    @property
    def role(self) -> str:
        """``segmentation``, ``robust``, ``parcellation`` or ``qc`` (:data:`ROLES`)."""
        return ROLES[self.architecture]

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": "1" if self.architecture == ARCHITECTURE else str(FORMAT_VERSION),
            "architecture": self.architecture,
            "network": json.dumps(self.network.to_dict() if self.network is not None else None, sort_keys=True),
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


def model_tensors(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors a model file stores: weights and BatchNorm statistics, no counters."""
    # clone with standard strides: a channels-last model's 1x1x1 kernels count as contiguous with
    # strides that safetensors and byte views cannot take
    return {
        k: v.detach().to("cpu", dtype).clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def save_model(path: str | os.PathLike, model: torch.nn.Module, info: ModelInfo,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` with ``info`` to ``path`` atomically (temporary file, then rename).

    ``model`` is a :class:`SynthSegUNet`, or the network of one of :data:`FIXED_ARCHITECTURES`
    (then ``info.architecture`` names it)."""
    path = Path(path)
    if info.architecture == ARCHITECTURE and model.config != info.network:
        raise ValueError("the model's configuration differs from info.network")
    _check_fixed(path, info)
    if info.role != "qc":
        check_label_list(info.labels)
        if len(info.labels) != info.network.out_channels:
            raise ValueError("one output label per output channel is required")
    tensors = model_tensors(model, dtype)
    expected = expected_tensor_shapes(info)
    if {k: tuple(v.shape) for k, v in tensors.items()} != expected:
        raise ValueError(f"the model's tensors do not match the {info.architecture} architecture")
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


def fixed_network(architecture: str) -> torch.nn.Module:
    """A new (random) network of one of :data:`FIXED_ARCHITECTURES`."""
    from .synthseg2_networks import QualityControlNet, RobustSegmenter, parcellation_config

    if architecture == "synthseg-robust-2.0":
        return RobustSegmenter()
    if architecture == "synthseg-parc-2.0":
        return SynthSegUNet(parcellation_config())
    if architecture == "synthseg-qc-2.0":
        return QualityControlNet()
    raise ValueError(f"unknown architecture {architecture!r}")


def fixed_info(architecture: str) -> tuple[UNetConfig | None, list[int]]:
    """The network configuration and output labels every file of a fixed architecture has."""
    from .synthseg2_networks import (
        PARCELLATION_LABELS,
        SEGMENTATION_LABELS_2,
        parcellation_config,
        robust_config,
    )

    return {"synthseg-robust-2.0": (robust_config("segmenter2"), list(SEGMENTATION_LABELS_2)),
            "synthseg-parc-2.0": (parcellation_config(), list(PARCELLATION_LABELS)),
            "synthseg-qc-2.0": (None, [])}[architecture]


def _check_fixed(path: Path, info: ModelInfo) -> None:
    """Refuse a fixed architecture whose stated network or labels are not its own."""
    if info.architecture == ARCHITECTURE:
        return
    if info.architecture not in FIXED_ARCHITECTURES:
        raise ModelFileError(f"{path}: unknown architecture {info.architecture!r}")
    network, labels = fixed_info(info.architecture)
    if info.network != network or list(info.labels) != labels:
        raise ModelFileError(f"{path}: the network or labels stated do not match the {info.architecture} "
                             "architecture")


def expected_tensor_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a model file of ``info`` stores (nothing allocated)."""
    if info.architecture == ARCHITECTURE:
        return info.network.tensor_shapes()
    with torch.device("meta"):
        net = fixed_network(info.architecture)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def check_tensor_layout(path: Path, network: UNetConfig | ModelInfo,
                        declared: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse tensors whose names, shapes or types do not match ``network`` (a U-Net's configuration,
    or a model's info) from the header alone."""
    expected = network.tensor_shapes() if isinstance(network, UNetConfig) else expected_tensor_shapes(network)
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
    if tensor.dtype == torch.float64:
        finite = bool(torch.isfinite(tensor).all())
    else:
        # a float64 sum is NaN or infinite exactly when a value is (float32, float16 and bfloat16
        # values cannot overflow it), and it is several times faster than isfinite().all()
        finite = math.isfinite(tensor.sum(dtype=torch.float64).item())
    if not finite:
        return f"tensor {name} holds NaN or infinite values"
    if name.endswith("running_var") and bool((tensor < 0).any()):
        return f"tensor {name} holds negative BatchNorm variances"
    return None


def _checked_header(path: Path) -> tuple[ModelInfo, dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The header's info, metadata and declared tensors, once the metadata and the tensor layout
    have been checked (no tensor read)."""
    meta, declared = _read_declared(path)
    info = _info_from_metadata(path, meta)
    check_tensor_layout(path, info, declared)
    return info, meta, declared


def _verified_tensors(path: Path, keep: bool) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """Check a model file: metadata, tensor layout (before reading any tensor), memory, then every
    tensor's values and the checksum. Returns the tensors too when ``keep``."""
    info, meta, declared = _checked_header(path)
    values = sum(math.prod(s) for s in expected_tensor_shapes(info).values())
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
    architecture = meta.get("architecture")
    if architecture not in ROLES:
        raise ModelFileError(f"{path}: unknown architecture {architecture!r}"
                             + (" (a newer synthseg-monai may read it: please upgrade)" if version >= 2 else ""))
    try:
        network_dict = json.loads(meta["network"])
        network = None if network_dict is None and architecture != ARCHITECTURE else UNetConfig.from_dict(network_dict)
        labels = [int(x) for x in json.loads(meta["labels"])]
        preprocessing = dict(DEFAULT_PREPROCESSING, **json.loads(meta.get("preprocessing", "{}")))
        provenance = json.loads(meta.get("provenance", "{}"))
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise ModelFileError(f"{path}: damaged model metadata ({e})") from e
    check_preprocessing(path, preprocessing)
    info = ModelInfo(network=network, labels=labels, name=meta.get("name", path.stem),
                     description=meta.get("description", ""),
                     synthseg_version=meta.get("synthseg_version", ""),
                     preprocessing=preprocessing, provenance=provenance, architecture=architecture)
    if architecture != ARCHITECTURE:
        _check_fixed(path, info)  # sizes fixed by SynthSeg 2.0: nothing else to check
        return info
    try:
        network.check_limits()
    except ValueError as e:
        raise ModelFileError(f"{path}: unsupported network: {e}") from e
    try:
        check_label_list(labels)
    except ValueError as e:
        raise ModelFileError(f"{path}: inconsistent labels: {e}") from e
    if len(labels) != network.out_channels:
        raise ModelFileError(f"{path}: inconsistent labels: {len(labels)} labels for "
                             f"{network.out_channels} output channels")
    return info


_ROLE_HINTS = {"segmentation": "a segmentation model", "robust": "SynthSeg-robust 2.0 (used by --robust)",
               "parcellation": "SynthSeg 2.0's cortical parcellation network (used by --parc)",
               "qc": "SynthSeg 2.0's QC network (used by --qc)"}


def check_role(path: Path, info: ModelInfo, role: str) -> None:
    """Refuse a model file whose network is not for ``role`` (naming what it is for)."""
    if info.role != role:
        raise ModelFileError(f"{path} is {_ROLE_HINTS[info.role]}, not {_ROLE_HINTS[role]}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", role: str | None = "segmentation"
               ) -> tuple[torch.nn.Module, ModelInfo]:
    """Load and verify a model file; returns the network in eval mode and its info (a
    :class:`SynthSegUNet`, or for :data:`FIXED_ARCHITECTURES` their network: ``info.role`` says which).
    A file whose role is not ``role`` is refused before any tensor is read (None: any role)."""
    path = Path(path)
    if role is not None:
        check_role(path, _checked_header(path)[0], role)
    info, tensors = _verified_tensors(path, keep=True)
    # built only once its configuration matches the tensors
    model = SynthSegUNet(info.network) if info.architecture == ARCHITECTURE else fixed_network(info.architecture)
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), info


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[UNetWeights, ModelInfo]:
    """Load and verify a segmentation model file, as :func:`load_model`, but return the network's
    tensors (float32, on ``device``) for :class:`~.inference.SlabNetwork` instead of a built network."""
    path = Path(path)
    check_role(path, _checked_header(path)[0], "segmentation")
    info, tensors = _verified_tensors(path, keep=True)  # the segmentation role: a plain U-Net
    # on the CPU the streamed inference convolves channels-last: kernels laid out so are used as
    # they are, not copied once more
    layout = torch.channels_last_3d if torch.device(device).type == "cpu" else torch.contiguous_format
    state = {k: v.to(device=device, dtype=torch.float32).contiguous(memory_format=layout) if v.dim() == 5
             else v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
    return UNetWeights.from_state_dict(info.network, state), info


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
