"""The tensors of a SynthSeg U-Net as the streamed inference (:mod:`.inference`) reads them.

:class:`UNetWeights` holds each level's convolutions and BatchNorm, and the head, of a
:class:`~.network.SynthSegUNet` (or of a U-Net without skip connections at its top levels, the
robust model's denoiser). It is taken from a built network, or straight from a model file's
tensors: segmenting an image then builds no ``torch.nn`` module, and does not import MONAI, whose
import (all of its submodules, scipy and matplotlib with them) took 1.8-1.9 s and 130 MB of
every run on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .network import KERAS_BN_EPS, UNetConfig


@dataclass(frozen=True)
class ConvWeights:
    """A convolution's weight (O, I, K, K, K) and bias (O)."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclass(frozen=True)
class BatchNormWeights:
    """An inference-mode BatchNorm; calling it normalises a (N, C, ...) tensor as
    ``torch.nn.BatchNorm3d.eval()`` does (the same ``batch_norm`` call)."""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float = KERAS_BN_EPS

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The same values as calling it, written into ``out`` (of ``x``'s shape and type; may be
        ``x`` itself, or rows of a buffer): no temporary of ``x``'s size when both are laid out
        alike (the kernel walks them as ``x`` is laid out)."""
        if any(a != b for a, b, n in zip(x.stride(), out.stride(), x.shape) if n > 1):
            return out.copy_(self(x))
        empty = x.new_empty(0, dtype=torch.float32)
        torch.ops.aten.native_batch_norm.out(x, self.weight, self.bias, self.running_mean, self.running_var,
                                             False, 0.0, self.eps, out=out, save_mean=empty,
                                             save_invstd=empty.clone())
        return out


@dataclass(frozen=True)
class LevelWeights:
    """One U-Net level: its convolutions (each followed by an ELU) and its BatchNorm."""

    convs: tuple[ConvWeights, ...]
    bn: BatchNormWeights


@dataclass(frozen=True)
class UNetWeights:
    """Everything :class:`~.inference.SlabNetwork` needs of a U-Net. ``skip_n_concatenations``
    top levels have no skip connection (0 for SynthSeg's segmentation networks)."""

    config: UNetConfig
    encoder: tuple[LevelWeights, ...]
    decoder: tuple[LevelWeights, ...]
    head: ConvWeights
    skip_n_concatenations: int = 0

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @classmethod
    def from_module(cls, model: torch.nn.Module) -> UNetWeights:
        """The (detached) tensors of a :class:`~.network.SynthSegUNet` or one of its subclasses."""

        def level(lv: torch.nn.Module) -> LevelWeights:
            bn = lv.bn
            return LevelWeights(
                tuple(ConvWeights(c.conv.weight.detach(), c.conv.bias.detach()) for c in lv.convs),
                BatchNormWeights(bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps))

        return cls(model.config, tuple(level(lv) for lv in model.encoder), tuple(level(lv) for lv in model.decoder),
                   ConvWeights(model.head.weight.detach(), model.head.bias.detach()),
                   getattr(model, "skip_n_concatenations", 0))

    @classmethod
    def from_state_dict(cls, config: UNetConfig, state: Mapping[str, torch.Tensor]) -> UNetWeights:
        """From a :class:`~.network.SynthSegUNet` state dict (a model file's tensors, whose names
        and shapes the caller has checked against ``config``)."""

        def level(prefix: str) -> LevelWeights:
            convs = tuple(ConvWeights(state[f"{prefix}.convs.{j}.conv.weight"], state[f"{prefix}.convs.{j}.conv.bias"])
                          for j in range(config.convs_per_level))
            bn = BatchNormWeights(*(state[f"{prefix}.bn.{name}"]
                                    for name in ("weight", "bias", "running_mean", "running_var")))
            return LevelWeights(convs, bn)

        return cls(config, tuple(level(f"encoder.{i}") for i in range(config.levels)),
                   tuple(level(f"decoder.{i}") for i in range(config.levels - 1)),
                   ConvWeights(state["head.weight"], state["head.bias"]))
