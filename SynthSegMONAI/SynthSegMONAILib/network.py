"""The SynthSeg 3D U-Net (Billot et al.), built from MONAI blocks, configurable in size.

Structure (SYNTHSEG_REFERENCE section 2): per encoder level ``convs_per_level`` 3x3x3
convolutions with ELU, then BatchNorm; the skip connection is taken *before* the BatchNorm,
whose output only feeds the 2x2x2 max-pooling. Each decoder level upsamples the previous
BatchNorm output (nearest neighbour), concatenates ``[skip, upsampled]``, applies the
convolutions and a BatchNorm. A 1x1x1 convolution gives the logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Keras BatchNormalization defaults used by SynthSeg.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch convention: 1 - Keras momentum (0.99)

#: Bounds on a network described by a file (model file, Keras import): SynthSeg's own is 1, 33, 5,
#: 24, 2, 2, 3. Files come from others, so the size is checked before anything is built.
NETWORK_LIMITS = {
    "in_channels": (1, 1),  # the pipeline feeds one image channel
    "out_channels": (2, 1024),
    "levels": (2, 8),
    "features": (1, 256),
    "feature_multiplier": (1, 4),
    "convs_per_level": (1, 6),
    "kernel_size": (1, 7),
}
MAX_PARAMETERS = 200_000_000  # about 15 times SynthSeg's 13.2 million


@dataclass(frozen=True)
class UNetConfig:
    """Size of a SynthSeg U-Net. The defaults are SynthSeg's own (2.0: 33 outputs)."""

    in_channels: int = 1
    out_channels: int = 33
    levels: int = 5
    features: int = 24
    feature_multiplier: int = 2
    convs_per_level: int = 2
    kernel_size: int = 3

    def level_features(self) -> list[int]:
        """Feature count of each level, top to bottom."""
        return [self.features * self.feature_multiplier**i for i in range(self.levels)]

    @property
    def size_multiple(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        if not isinstance(d, dict):
            raise ValueError(f"network settings must be a mapping, not {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown network settings: {sorted(unknown)}")
        try:
            cfg = cls(**{k: int(v) for k, v in d.items()})
        except (TypeError, OverflowError) as e:
            raise ValueError(f"network settings must be integers ({e})") from e
        if min(cfg.in_channels, cfg.out_channels, cfg.levels, cfg.features,
               cfg.feature_multiplier, cfg.convs_per_level) < 1:
            raise ValueError("network settings must be positive")
        if cfg.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        return cfg

    def check_limits(self) -> None:
        """Raise ValueError if a setting or the parameter count is outside :data:`NETWORK_LIMITS`."""
        for name, (low, high) in NETWORK_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} = {value} is outside the supported range {low} to {high}")
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size = {self.kernel_size} must be odd")
        n = self.parameter_count()
        if n > MAX_PARAMETERS:
            raise ValueError(f"the network would have {n:,} parameters (limit {MAX_PARAMETERS:,})")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor a model file stores for this network (the state dict of
        :class:`SynthSegUNet` without BatchNorm counters), computed without building it."""
        feats, k = self.level_features(), self.kernel_size
        shapes: dict[str, tuple[int, ...]] = {}

        def level(prefix: str, cin: int, cout: int) -> None:
            for j in range(self.convs_per_level):
                shapes[f"{prefix}.convs.{j}.conv.weight"] = (cout, cin if j == 0 else cout, k, k, k)
                shapes[f"{prefix}.convs.{j}.conv.bias"] = (cout,)
            for name in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{prefix}.bn.{name}"] = (cout,)

        for i in range(self.levels):
            level(f"encoder.{i}", self.in_channels if i == 0 else feats[i - 1], feats[i])
        for i in range(self.levels - 1):
            level(f"decoder.{i}", feats[i] + feats[i + 1], feats[i])
        shapes["head.weight"] = (self.out_channels, feats[0], 1, 1, 1)
        shapes["head.bias"] = (self.out_channels,)
        return shapes

    def parameter_count(self) -> int:
        """Number of values in :meth:`tensor_shapes` (weights and BatchNorm statistics)."""
        return sum(math.prod(s) for s in self.tensor_shapes().values())


class UNetLevel(nn.Module):
    """``convs_per_level`` x (conv + ELU), then BatchNorm (kept apart: it is not on the skip)."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int, kernel_size: int):
        # imported here: segmenting an image reads the weights without building the network
        # (:mod:`.network_weights`) and so never pays for MONAI's import
        from monai.networks.blocks import Convolution

        super().__init__()
        self.convs = nn.ModuleList(
            Convolution(
                spatial_dims=3,
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                kernel_size=kernel_size,
                act=("elu", {"alpha": 1.0}),
                norm=None,
                bias=True,
            )
            for i in range(n_convs)
        )
        self.bn = nn.BatchNorm3d(out_channels, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutions' output (the skip connection)."""
        for conv in self.convs:
            x = conv(x)
        return x


class SynthSegUNet(nn.Module):
    """SynthSeg's U-Net; ``forward`` returns logits (softmax them for posteriors)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        feats = c.level_features()
        self.encoder = nn.ModuleList(
            UNetLevel(c.in_channels if i == 0 else feats[i - 1], feats[i], c.convs_per_level,
                      c.kernel_size)
            for i in range(c.levels)
        )
        # decoder[i] works at level i (0 = top), for i = levels-2 .. 0
        self.decoder = nn.ModuleList(
            UNetLevel(feats[i] + feats[i + 1], feats[i], c.convs_per_level, c.kernel_size)
            for i in range(c.levels - 1)
        )
        self.head = nn.Conv3d(feats[0], c.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(x.shape[2:])} must be multiples of {m}")
        skips = []
        for i, level in enumerate(self.encoder):
            skip = level.features(x)
            x = level.bn(skip)
            if i < len(self.encoder) - 1:
                skips.append(skip)
                x = F.max_pool3d(x, 2)
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([skips[i], x], dim=1)
            level = self.decoder[i]
            x = level.bn(level.features(x))
        return self.head(x)


def count_parameters(model: nn.Module, include_buffers: bool = True) -> int:
    """Trainable parameters, plus BatchNorm running mean/variance when asked (as Keras counts)."""
    n = sum(p.numel() for p in model.parameters())
    if include_buffers:
        n += sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    return n
