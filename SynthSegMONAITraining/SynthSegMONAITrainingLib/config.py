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
    """SynthSeg's generative model: the random draws that turn a label map into a training image.

    Each sample draws its own value of every random parameter, uniformly between the bounds
    given here unless said otherwise (see :class:`~.synthesis.Synthesizer`). The defaults are
    SynthSeg 1.0's training settings; "SynthSeg" below gives the matching default of SynthSeg's
    ``BrainGenerator`` (``SynthSeg/brain_generator.py``) and of the layers it builds. Voxels are
    the label map's (after ``data.downsample``); intensities are on the Gaussian mixture's
    arbitrary scale, clipped to ``clip_range`` before the image is rescaled to [0, 1].

    Crop and flip:

    - ``crop_size``: [X, Y, Z] voxels of each sample, each >= 1 and a multiple of the U-Net's size
      multiple (16 for 5 levels). SynthSeg: ``output_shape`` = 160 in its training script (160^3).
    - ``flip_probability``: probability of a left-right flip (swapping left and right labels),
      0 to 1. SynthSeg: ``flipping`` = True, with probability 0.5.

    Affine deformation, drawn per axis:

    - ``scaling_bounds``: scale factor in U(1 - b, 1 + b); 0 <= b < 1. SynthSeg: 0.2.
    - ``rotation_bounds``: angle in U(-b, b) degrees; b >= 0. SynthSeg: 15.
    - ``shearing_bounds``: shear in U(-b, b) (dimensionless); b >= 0. SynthSeg: 0.012.
    - ``translation_bounds``: shift in U(-b, b) voxels; b >= 0. SynthSeg: False (no translation).

    Elastic deformation (a stationary velocity field integrated into a diffeomorphism):

    - ``nonlin_std``: upper bound of the field's standard deviation, drawn in U(0, b), in voxels;
      >= 0, 0 turns it off. SynthSeg: 4.
    - ``nonlin_shape``: control points of the field per axis, >= 2. SynthSeg: ``nonlin_scale`` =
      0.04 of the label map's size, i.e. 11 for SynthSeg's 256^3 maps.
    - ``integration_steps``: scaling-and-squaring steps, >= 0. SynthSeg: 7 (``VecInt``).

    Gaussian mixture, one mean and one standard deviation per GMM class:

    - ``mean_range``: [min, max] of the means, min <= max. SynthSeg: [0, 250] (``prior_means``
      None: 125 +- 125).
    - ``std_range``: [min, max] of the standard deviations, min <= max. SynthSeg: [0, 35] in its
      paper; its code's ``prior_stds`` None gives [0, 30].
    - ``background_zero_probability``: probability that the background is exactly 0 (mean and
      standard deviation 0), 0 to 1. SynthSeg: 0.05.
    - ``background_dark_probability``: probability of a dark background instead, 0 to 1 (the
      two probabilities together at most 1). SynthSeg: 0.25.
    - ``background_dark_mean_max``: a dark background's mean in U(0, b); b >= 0. SynthSeg's code: 15
      (25 here).
    - ``background_dark_std_max``: a dark background's standard deviation in U(0, b); b >= 0.
      SynthSeg: 5.

    Bias field (multiplicative: the exponential of a smooth Gaussian field):

    - ``bias_field_probability``: probability of a bias field, 0 to 1. SynthSeg: 0.95.
    - ``bias_field_std``: upper bound of the log-field's standard deviation, drawn in U(0, b);
      >= 0. SynthSeg: 0.7.
    - ``bias_field_shape``: control points of the field per axis, >= 2. SynthSeg: ``bias_scale``
      = 0.025 of the crop, i.e. 4 for 160^3.

    Intensity:

    - ``clip_range``: [min, max] intensities kept before rescaling to [0, 1], min <= max.
      SynthSeg: ``clip`` = 300, i.e. [0, 300].
    - ``gamma_std``: the image in [0, 1] is raised to exp(N(0, s)); s >= 0. SynthSeg: 0.5.

    Resolution (the sample is blurred as a thick-slice acquisition, downsampled, then linearly
    upsampled back to the crop's grid):

    - ``native_resolution_probability``: probability of keeping the label map's resolution, 0 to
      1. SynthSeg: 0.05 (``prob_min``).
    - ``isotropic_resolution_probability``: probability of an isotropic low resolution, 0 to 1
      (the two probabilities together at most 1; else one axis gets an anisotropic one).
      SynthSeg: 0.1 (``prob_iso``).
    - ``isotropic_resolution_range``: [min, max] mm of an isotropic resolution, min >= 1.
      SynthSeg: from the label map's resolution to ``max_res_iso`` = 4.
    - ``anisotropic_resolution_range``: [min, max] mm of the one low-resolution axis, min >= 1.
      SynthSeg: from the label map's resolution to ``max_res_aniso`` = 8.
    - ``blur_factor``: Gaussian blur sigma = factor x slice thickness (drawn between the label
      map's resolution and the acquisition's), in voxels of the map; >= 0. SynthSeg: 0.75.
    - ``blur_jitter``: sigma multiplied by U(1 - j, 1 + j); 0 <= j < 1. SynthSeg: 1.03, i.e.
      U(1/1.03, 1.03).
    - ``noise_std_max``: extra Gaussian noise on the [0, 1] image, its standard deviation in
      U(0, b); >= 0, 0 turns it off. SynthSeg 1.0: none beyond the mixture's own.
    """

    crop_size: list[int] = field(default_factory=lambda: [160, 160, 160])
    flip_probability: float = 0.5
    scaling_bounds: float = 0.2
    rotation_bounds: float = 15.0
    shearing_bounds: float = 0.012
    translation_bounds: float = 0.0
    nonlin_std: float = 4.0
    nonlin_shape: int = 11
    integration_steps: int = 7
    mean_range: list[float] = field(default_factory=lambda: [0.0, 250.0])
    std_range: list[float] = field(default_factory=lambda: [0.0, 35.0])
    background_zero_probability: float = 0.05
    background_dark_probability: float = 0.25
    background_dark_mean_max: float = 25.0
    background_dark_std_max: float = 5.0
    bias_field_probability: float = 0.95
    bias_field_std: float = 0.7
    bias_field_shape: int = 4
    clip_range: list[float] = field(default_factory=lambda: [0.0, 300.0])
    gamma_std: float = 0.5
    native_resolution_probability: float = 0.05
    isotropic_resolution_probability: float = 0.10
    isotropic_resolution_range: list[float] = field(default_factory=lambda: [1.0, 4.0])
    anisotropic_resolution_range: list[float] = field(default_factory=lambda: [1.0, 8.0])
    blur_factor: float = 0.75
    blur_jitter: float = 0.03
    noise_std_max: float = 0.0


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
    #: folder of subject folders each holding an image and its FreeSurfer aseg; each image is
    #: segmented with the engine's own pipeline (default mode, as users run it) and scored as
    #: ``synthseg-monai evaluate`` scores it
    real_images: str = ""
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
    from SynthSegMONAILib import UNetConfig

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
