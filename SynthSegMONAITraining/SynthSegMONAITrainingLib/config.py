"""Training configuration: every setting in one tree of dataclasses, read from YAML or JSON.

The defaults are SynthSeg 1.0's training settings (``SYNTHSEG_REFERENCE`` section 4):
160^3 crops, batch size 1, Adam at 1e-4, soft Dice over every label, about 505k steps of
which the first 5,000 use an L2 loss on the logits. Command-line overrides are applied on
top with :func:`apply_overrides` (``section.key=value``, values parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which setting and why."""


@dataclass
class DataConfig:
    """Where the label maps come from and how they are prepared."""

    label_maps: str = ""  #: folder of ``*.nii``/``*.nii.gz``/``*.mgz`` label maps, a glob, or a cache ``.npz``
    validation_maps: int = 2  #: the last N maps (sorted by name) are held out for validation
    downsample: int = 1  #: integer factor (nearest neighbour), for quick experiments and tests
    margin: int = 8  #: voxels kept around the labels' bounding box when caching a map
    generation_table: str = ""  #: CSV generation_label,gmm_class,target_v1,target_v2,lr_pair


@dataclass
class SynthesisConfig:
    """SynthSeg's generative model; ranges as in SynthSeg 1.0."""

    crop_size: list[int] = field(default_factory=lambda: [160, 160, 160])
    flip_probability: float = 0.5
    scaling_bounds: float = 0.2  #: scale U(1 - b, 1 + b) per axis
    rotation_bounds: float = 15.0  #: degrees, U(-b, b) per axis
    shearing_bounds: float = 0.012
    translation_bounds: float = 0.0  #: voxels
    nonlin_std: float = 4.0  #: upper bound of the velocity field's std (voxels)
    nonlin_shape: int = 11  #: control points of the velocity field per axis
    integration_steps: int = 7  #: scaling and squaring steps
    mean_range: list[float] = field(default_factory=lambda: [0.0, 250.0])
    std_range: list[float] = field(default_factory=lambda: [0.0, 35.0])
    background_zero_probability: float = 0.05
    background_dark_probability: float = 0.25
    background_dark_mean_max: float = 25.0
    background_dark_std_max: float = 5.0
    bias_field_probability: float = 0.95
    bias_field_std: float = 0.7  #: upper bound of the log-field's std
    bias_field_shape: int = 4
    clip_range: list[float] = field(default_factory=lambda: [0.0, 300.0])
    gamma_std: float = 0.5  #: image ** exp(N(0, gamma_std))
    native_resolution_probability: float = 0.05
    isotropic_resolution_probability: float = 0.10
    isotropic_resolution_range: list[float] = field(default_factory=lambda: [1.0, 4.0])  #: mm
    anisotropic_resolution_range: list[float] = field(default_factory=lambda: [1.0, 8.0])  #: mm
    blur_factor: float = 0.75  #: blur sigma = factor x slice thickness
    blur_jitter: float = 0.03  #: sigma multiplied by U(1 - j, 1 + j)
    noise_std_max: float = 0.0  #: extra Gaussian noise (SynthSeg 1.0 has none beyond the GMM)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = "adam"  #: adam or adamw
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0  #: linear warm-up from 0
    schedule: str = "constant"  #: constant, linear, cosine or poly (after warm-up)
    min_lr_ratio: float = 0.0  #: final lr / lr for linear, cosine and poly
    poly_power: float = 0.9
    grad_clip: float = 0.0  #: max gradient norm, 0 = off


@dataclass
class TrainingConfig:
    """The loop itself."""

    synthseg_version: str = "1.0"  #: 1.0 (32 labels) or 2.0 (33 labels, with CSF)
    steps: int = 505_000
    batch_size: int = 1  #: per process
    l2_warmup_steps: int = 5_000  #: steps of L2 loss on the logits (target +-5) before Dice
    dice_epsilon: float = 1e-7
    seed: int = 1234
    device: str = "auto"  #: auto, cpu, cuda, cuda:N
    bf16: bool = True  #: bf16 autocast, on CUDA only
    channels_last: bool = False
    threads: int = 0  #: torch CPU threads, 0 = leave PyTorch's default
    log_every: int = 50
    checkpoint_every: int = 1000
    name: str = "synthseg-monai-trained"
    description: str = "SynthSeg U-Net trained with synthetic images (SynthSeg-MONAI)"


@dataclass
class ValidationConfig:
    """Validation on synthetic images from held-out maps, and optionally on real images."""

    every: int = 5000
    samples: int = 4  #: synthetic samples, drawn with a fixed seed
    seed: int = 20240101
    crop_size: list[int] = field(default_factory=list)  #: default: the training crop
    real_images: str = ""  #: folder of subject folders each holding an image and its labels
    real_image_name: str = "T1.mgz"
    real_label_name: str = "aseg.mgz"
    real_max_subjects: int = 0  #: 0 = all
    snapshot: bool = True


@dataclass
class DistributedConfig:
    """torch.distributed settings (the rest comes from torchrun's environment)."""

    backend: str = "auto"  #: auto (nccl on GPU, gloo on CPU), nccl or gloo
    timeout_s: int = 600  #: a collective that waits longer ends the run with an error


@dataclass
class Config:
    """Everything a training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    network: dict = field(default_factory=lambda: {"levels": 5, "features": 24, "feature_multiplier": 2,
                                                   "convs_per_level": 2, "kernel_size": 3})
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)


def _convert(tp, value, where: str):
    """Check and convert ``value`` to type ``tp`` (a dataclass, list[X], scalar or dict)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, types.UnionType):  # pragma: no cover - not used by the dataclasses
        raise ConfigError(f"{where}: unsupported type")
    return value


def _build(cls, values: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown setting(s): {', '.join(prefix + u for u in unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Raise :class:`ConfigError` for settings that cannot work together."""
    s, t, o, v = cfg.synthesis, cfg.training, cfg.optim, cfg.validation
    if t.synthseg_version not in ("1.0", "2.0"):
        raise ConfigError("training.synthseg_version must be 1.0 or 2.0")
    if len(s.crop_size) != 3 or min(s.crop_size) < 1:
        raise ConfigError("synthesis.crop_size must be three positive integers")
    if v.crop_size and (len(v.crop_size) != 3 or min(v.crop_size) < 1):
        raise ConfigError("validation.crop_size must be empty or three positive integers")
    for name in ("mean_range", "std_range", "clip_range", "isotropic_resolution_range",
                 "anisotropic_resolution_range"):
        r = getattr(s, name)
        if len(r) != 2 or r[0] > r[1]:
            raise ConfigError(f"synthesis.{name} must be [min, max] with min <= max")
    if s.isotropic_resolution_range[0] < 1 or s.anisotropic_resolution_range[0] < 1:
        raise ConfigError("resolution ranges start at 1 mm or more")
    for name in ("flip_probability", "background_zero_probability", "background_dark_probability",
                 "bias_field_probability", "native_resolution_probability",
                 "isotropic_resolution_probability"):
        p = getattr(s, name)
        if not 0 <= p <= 1:
            raise ConfigError(f"synthesis.{name} must be between 0 and 1")
    if s.nonlin_shape < 2 or s.bias_field_shape < 2:
        raise ConfigError("synthesis.nonlin_shape and bias_field_shape must be 2 or more")
    if min(s.nonlin_std, s.bias_field_std, s.gamma_std, s.noise_std_max, s.scaling_bounds,
           s.rotation_bounds, s.shearing_bounds, s.translation_bounds) < 0:
        raise ConfigError("synthesis bounds and standard deviations must be non-negative")
    if s.scaling_bounds >= 1:
        raise ConfigError("synthesis.scaling_bounds must be below 1")
    if t.steps < 1 or t.batch_size < 1:
        raise ConfigError("training.steps and training.batch_size must be positive")
    if min(t.l2_warmup_steps, t.log_every - 1, t.checkpoint_every - 1, v.every - 1, v.samples) < 0:
        raise ConfigError("step counts must be positive (l2_warmup_steps and samples may be 0)")
    if o.optimizer not in ("adam", "adamw"):
        raise ConfigError("optim.optimizer must be adam or adamw")
    if o.schedule not in ("constant", "linear", "cosine", "poly"):
        raise ConfigError("optim.schedule must be constant, linear, cosine or poly")
    if o.lr <= 0 or len(o.betas) != 2 or o.warmup_steps < 0:
        raise ConfigError("optim.lr must be positive, optim.betas two numbers, warmup_steps >= 0")
    if cfg.distributed.backend not in ("auto", "nccl", "gloo"):
        raise ConfigError("distributed.backend must be auto, nccl or gloo")
    if cfg.data.downsample < 1 or cfg.data.validation_maps < 0:
        raise ConfigError("data.downsample must be >= 1 and data.validation_maps >= 0")
    from SynthSegMONAILib.network import UNetConfig

    net = dict(cfg.network)
    net.pop("out_channels", None)
    try:
        UNetConfig.from_dict(net)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"network: {e}") from e
    return cfg


def from_dict(values: dict) -> Config:
    """Build and validate a configuration from a nested dict (missing settings: defaults)."""
    if not isinstance(values, dict):
        raise ConfigError("a configuration must be a mapping of sections")
    return validate(_build(Config, values))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML or JSON file (or the defaults when ``path`` is None) and apply overrides."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"configuration file not found: {path}")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(values, overrides or [])
    return from_dict(values)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value: {e}") from e
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return values


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
