"""The SynthSeg 3D U-Net (Billot et al.), built from MONAI blocks, configurable in size.

Structure (SYNTHSEG_REFERENCE section 2): per encoder level ``convs_per_level`` 3x3x3
convolutions with ELU, then BatchNorm; the skip connection is taken *before* the BatchNorm,
whose output only feeds the 2x2x2 max-pooling. Each decoder level upsamples the previous
BatchNorm output (nearest neighbour), concatenates ``[skip, upsampled]``, applies the
convolutions and a BatchNorm. A 1x1x1 convolution gives the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.nn import functional as F

# Keras BatchNormalization defaults used by SynthSeg.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch convention: 1 - Keras momentum (0.99)


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
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown network settings: {sorted(unknown)}")
        cfg = cls(**{k: int(v) for k, v in d.items()})
        if min(cfg.in_channels, cfg.out_channels, cfg.levels, cfg.features,
               cfg.feature_multiplier, cfg.convs_per_level) < 1:
            raise ValueError("network settings must be positive")
        if cfg.kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        return cfg


class UNetLevel(nn.Module):
    """``convs_per_level`` x (conv + ELU), then BatchNorm (kept apart: it is not on the skip)."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int, kernel_size: int):
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
