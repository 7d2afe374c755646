"""SynthSeg 2.0's robust, parcellation and QC networks and the way the original chains them.

The original builds one Keras model per run (``SynthSeg/predict_synthseg.py::build_model``,
commit 66342c1); this module provides its pieces as PyTorch modules and one function per
chain, so a pipeline can call them in the original's order:

- robust (``--robust``): :class:`RobustSegmenter`: a U-Net segments the image into 5 label
  groups, the one-hot of its argmax goes through a denoising U-Net (5x5x5 kernels, no skip
  connections at its two top levels), the one-hot of *that* argmax is concatenated after the
  image and a third U-Net gives the 33 posteriors. No posterior smoothing, no flip pass.
- parcellation (``--parc``): :func:`parcellation_input` (image, then the one-hot of
  "segmentation argmax is cortex (3 or 42)") and :func:`parcellation_posteriors` (U-Net with
  69 outputs, then optionally the same 3x3x3 Gaussian smoothing as the segmentation).
- QC (``--qc``): :func:`qc_crop_to_shape` (the original's ``MakeShape`` layer, including its
  use of *channel index* 24 rather than label 24), :func:`qc_input` and :func:`qc_scores`
  (:class:`QualityControlNet`: residual ReLU encoder, two 5x5x5 convolutions, mean over space).

Tensors follow the engine's convention: an image is (X, Y, Z), posteriors are (C, X, Y, Z),
all on the padded, RAS-aligned grid the network sees.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .inference import gaussian_kernel_3d
from .labels import PARCELLATION_LABELS
from .labels import (
    PARCELLATION_NAMES as PARCELLATION_NAMES,  # re-exported: the parcellation tables live in labels
)
from .network import SynthSegUNet, UNetConfig, UNetLevel

#: SynthSeg 2.0's segmentation labels in channel order (ascending label value).
SEGMENTATION_LABELS_2 = (0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 41, 42, 43,
                         44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
#: Labels whose voxels the parcellation network labels (left and right cerebral cortex).
CORTEX_LABELS = (3, 42)
#: Number of label groups of the robust model's first segmenter and denoiser
#: (``np.unique(synthseg_denoiser_labels_2.0.npy)``).
DENOISER_GROUPS = 5
#: QC group of each segmentation label (``synthseg_qc_labels_2.0.npy`` at each label's first entry).
QC_GROUPS = {0: 0, 2: 1, 3: 2, 4: 3, 5: 3, 7: 4, 8: 4, 10: 6, 11: 1, 12: 7, 13: 7, 14: 3, 15: 3, 16: 5,
             17: 8, 18: 8, 24: 0, 26: 1, 28: 1, 41: 1, 42: 2, 43: 3, 44: 3, 46: 4, 47: 4, 49: 6, 50: 1,
             51: 7, 52: 7, 53: 8, 54: 8, 58: 1, 60: 1}
#: Names of QC groups 0..8; the QC CSV has groups 1..8 (``synthseg_qc_names_2.0.npy``).
QC_NAMES = ("background", "general white matter", "general grey matter", "general csf", "cerebellum",
            "brainstem", "thalamus", "putamen+pallidum", "hippocampus+amygdala")
#: ``MakeShape`` leaves out voxels whose argmax *index* is 0 or this (index 24 is label 47 in
#: 2.0's channel order; the original compares the index with the CSF label value 24).
QC_IGNORED_INDEX = 24
#: Cube side of the QC network's input (``predict_synthseg.py::predict``, input_shape_qc=224).
QC_INPUT_SHAPE = 224


class DenoiserUNet(SynthSegUNet):
    """SynthSeg's U-Net without skip connections at its ``skip_n_concatenations`` top levels
    (``ext/neuron/models.py::conv_dec``): the robust model's label denoiser (``l2l``)."""

    def __init__(self, config: UNetConfig, skip_n_concatenations: int = 2):
        super().__init__(config)
        self.skip_n_concatenations = skip_n_concatenations
        feats = config.level_features()
        for i in range(min(skip_n_concatenations, config.levels - 1)):
            self.decoder[i] = UNetLevel(feats[i + 1], feats[i], config.convs_per_level, config.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(x.shape[2:])} must be multiples of {m}")
        skips = []
        for i, level in enumerate(self.encoder):
            skip = level.features(x)
            x = level.bn(skip)
            if i < len(self.encoder) - 1:
                skips.append(skip if i >= self.skip_n_concatenations else None)  # unused skips freed
                x = F.max_pool3d(x, 2)
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            if i >= self.skip_n_concatenations:
                x = torch.cat([skips[i], x], dim=1)
            level = self.decoder[i]
            x = level.bn(level.features(x))
        return self.head(x)


class QCLevel(nn.Module):
    """One residual level of the QC encoder: ReLU conv, linear conv, plus the level's input
    (through a ReLU conv when the feature counts differ), ReLU, BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        pad = kernel_size // 2
        self.conv0 = nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad)
        self.conv1 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad)
        expand = in_channels > 1 and out_channels > 1 and in_channels != out_channels
        self.expand = nn.Conv3d(in_channels, out_channels, kernel_size, padding=pad) if expand else None
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            residual = F.relu(self.expand(x)) if self.expand is not None else x
            return self.bn(F.relu(residual + self.conv1(F.relu(self.conv0(x)))))
        # inference: the same operations in place, so at most three activations are alive (x, y,
        # and the residual): 3.3 GB at 224^3 instead of 5
        y = self.conv1(F.relu(self.conv0(x), inplace=True))
        y += F.relu(self.expand(x), inplace=True) if self.expand is not None else x
        return self.bn(F.relu(y, inplace=True))


class QualityControlNet(nn.Module):
    """SynthSeg 2.0's QC regressor (``build_model``'s ``conv_enc(name='qc', use_residuals=True)``
    and its ``qc_final_*`` layers): returns one raw score per QC group."""

    def __init__(self, in_channels: int = len(QC_NAMES), out_channels: int = len(QC_NAMES),
                 features: int = 24, levels: int = 4, kernel_size: int = 5):
        super().__init__()
        feats = [features * 2**i for i in range(levels)]
        self.levels = nn.ModuleList(QCLevel(in_channels if i == 0 else feats[i - 1], feats[i], kernel_size)
                                    for i in range(levels))
        pad = kernel_size // 2
        self.final0 = nn.Conv3d(feats[-1], out_channels, kernel_size, padding=pad)
        self.final1 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, groups, X, Y, Z) one-hot -> (B, groups) scores."""
        for level in self.levels:
            x = F.max_pool3d(level(x), 2, ceil_mode=True)  # Keras 'same' pooling; the last is qc_maxpool_3
        x = F.relu(self.final1(F.relu(self.final0(x))))
        return x.mean(dim=(2, 3, 4))


def robust_config(part: str) -> UNetConfig:
    """Size of each U-Net of the robust model: ``segmenter`` (``unet``), ``denoiser`` (``l2l``)
    or ``segmenter2`` (``unet2``), as ``build_model`` hard-codes them."""
    return {
        "segmenter": UNetConfig(in_channels=1, out_channels=DENOISER_GROUPS),
        "denoiser": UNetConfig(in_channels=DENOISER_GROUPS, out_channels=DENOISER_GROUPS, features=16,
                               kernel_size=5),
        "segmenter2": UNetConfig(in_channels=1 + DENOISER_GROUPS, out_channels=len(SEGMENTATION_LABELS_2)),
    }[part]


def parcellation_config() -> UNetConfig:
    """Size of the parcellation U-Net (``unet_parc``): image + 2 mask channels -> 69 labels."""
    return UNetConfig(in_channels=3, out_channels=len(PARCELLATION_LABELS))


class RobustSegmenter(nn.Module):
    """SynthSeg-robust 2.0 (``synthseg_robust_2.0.h5``): segmenter -> denoiser -> segmenter2."""

    def __init__(self):
        super().__init__()
        self.segmenter = SynthSegUNet(robust_config("segmenter"))
        self.denoiser = DenoiserUNet(robust_config("denoiser"), skip_n_concatenations=2)
        self.segmenter2 = SynthSegUNet(robust_config("segmenter2"))

    def stages(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Softmax of each network for a padded (X, Y, Z) image: ``groups`` (5, X, Y, Z),
        ``denoised`` (5, X, Y, Z) and ``posteriors`` (33, X, Y, Z)."""
        x = image[None, None]
        groups = torch.softmax(self.segmenter(x), 1)
        denoised = torch.softmax(self.denoiser(one_hot_argmax(groups, DENOISER_GROUPS)), 1)
        second = torch.cat([x, one_hot_argmax(denoised, DENOISER_GROUPS)], 1)
        posteriors = torch.softmax(self.segmenter2(second), 1)
        return {"groups": groups[0], "denoised": denoised[0], "posteriors": posteriors[0]}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Posteriors (33, X, Y, Z) of a padded (X, Y, Z) image (``unet2_prediction``)."""
        return self.stages(image)["posteriors"]


def one_hot_argmax(posteriors: torch.Tensor, depth: int) -> torch.Tensor:
    """``tf.one_hot(tf.argmax(x, -1), depth)`` of (B, C, ...) posteriors, channels first, float."""
    index = posteriors.argmax(1)  # first maximum wins, as tf.argmax
    return F.one_hot(index, depth).movedim(-1, 1).to(posteriors.dtype)


def smooth_posteriors(posteriors: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """``layers.GaussianBlur(sigma)`` of (C, X, Y, Z) posteriors: each channel convolved with the
    3x3x3 Gaussian (normalised to sum 1), zero padded."""
    kernel = gaussian_kernel_3d(sigma).to(posteriors)
    pad = kernel.shape[0] // 2
    return F.conv3d(posteriors[:, None], kernel[None, None], padding=pad)[:, 0]


def parcellation_input(image: torch.Tensor, seg_posteriors: torch.Tensor,
                       labels: tuple[int, ...] | list[int] = SEGMENTATION_LABELS_2) -> torch.Tensor:
    """The parcellation network's input (1, 3, X, Y, Z): the image, then ``1 - cortex`` and
    ``cortex``, where cortex means the argmax of ``seg_posteriors`` is label 3 or 42."""
    is_cortex = torch.tensor([lab in CORTEX_LABELS for lab in labels], device=seg_posteriors.device)
    cortex = is_cortex[seg_posteriors.argmax(0)].to(image.dtype)
    return torch.stack([image, 1 - cortex, cortex])[None]


def parcellation_posteriors(parc_net: SynthSegUNet, image: torch.Tensor, seg_posteriors: torch.Tensor,
                            labels: tuple[int, ...] | list[int] = SEGMENTATION_LABELS_2,
                            sigma: float | None = 0.5) -> torch.Tensor:
    """Parcellation posteriors (69, X, Y, Z) of a padded image, given the segmentation
    posteriors whose argmax decides the cortex mask. ``sigma`` None: the network's softmax as it
    is; the original smooths them (0.5) with ``--parc`` alone, but outputs the unsmoothed
    ``unet_parc_prediction`` when ``--qc`` is also given."""
    post = torch.softmax(parc_net(parcellation_input(image, seg_posteriors, labels)), 1)[0]
    return smooth_posteriors(post, sigma) if sigma else post


def qc_crop_to_shape(index_map: torch.Tensor, target: int | tuple[int, int, int] = QC_INPUT_SHAPE,
                     ignored_index: int = QC_IGNORED_INDEX) -> torch.Tensor:
    """``predict_synthseg.py::MakeShape``: crop/zero-pad an argmax *index* map (X, Y, Z) to
    ``target`` around the bounding box of the voxels whose index is neither 0 nor
    ``ignored_index``; the box is grown (or shrunk) around its centre, the extra low side being
    ceil(d/2) and the high side floor(d/2)."""
    shape = np.array(index_map.shape)
    target = np.array([target] * 3 if isinstance(target, int) else target)
    found = torch.nonzero((index_map != 0) & (index_map != ignored_index))
    if len(found) == 0:
        lo, hi = np.zeros(3, int), np.minimum(shape, target)
    else:
        lo = np.maximum(found.min(0).values.cpu().numpy(), 0)
        hi = np.minimum(found.max(0).values.cpu().numpy() + 1, shape)
    diff = target - (hi - lo)
    lo, hi = lo - np.ceil(diff / 2).astype(int), hi + np.floor(diff / 2).astype(int)
    a, b = np.maximum(lo, 0), np.minimum(hi, shape)
    out = index_map[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
    before, after = np.abs(np.minimum(lo, 0)), np.maximum(hi - shape, 0)
    if (before > 0).any() or (after > 0).any():
        pad = [int(v) for axis in (2, 1, 0) for v in (before[axis], after[axis])]
        out = F.pad(out, pad)
    return out


def qc_input(seg_posteriors: torch.Tensor, labels: tuple[int, ...] | list[int] = SEGMENTATION_LABELS_2,
             target: int | tuple[int, int, int] = QC_INPUT_SHAPE) -> torch.Tensor:
    """The QC network's input (1, 9, T, T, T): argmax of the padded segmentation posteriors,
    :func:`qc_crop_to_shape`, label values, QC groups (:data:`QC_GROUPS`), one-hot."""
    index = qc_crop_to_shape(seg_posteriors.argmax(0), target)
    lut = torch.tensor([QC_GROUPS.get(lab, 0) for lab in labels], device=index.device)
    return F.one_hot(lut[index], len(QC_NAMES)).movedim(-1, 0)[None].to(seg_posteriors.dtype)


def qc_scores(qc_net: QualityControlNet, seg_posteriors: torch.Tensor,
              labels: tuple[int, ...] | list[int] = SEGMENTATION_LABELS_2,
              target: int | tuple[int, int, int] = QC_INPUT_SHAPE) -> torch.Tensor:
    """Raw QC scores (9,) for groups 0..8 from padded segmentation posteriors (C, X, Y, Z). The
    CSV holds groups 1..8, clipped to [0, 1] and written with 4 decimals (:func:`qc_csv_values`)."""
    return qc_net(qc_input(seg_posteriors, labels, target))[0]


def qc_csv_values(scores: torch.Tensor | np.ndarray) -> list[str]:
    """The QC CSV's values: ``'%.4f' % q`` of ``np.around(np.clip(scores[1:], 0, 1), 4)`` on the
    float32 scores (``predict_synthseg.py::predict``)."""
    s = np.around(np.clip(np.asarray(scores, dtype=np.float32).reshape(-1)[1:], 0, 1), 4)
    return [f"{q:.4f}" for q in s]
