"""Helpers for tests and the module self-test: a tiny model whose output is predictable.

The network passes the (normalised) intensity straight through to the head, which turns it
into labels by nearest intensity level: the segmentation of a phantom made of regions of
known intensity is known in advance, so geometry and names can be checked exactly, without
real weights. Label blocks test the scene side without PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# label -> normalised intensity level the tiny model maps to it
PHANTOM_LEVELS = {0: 0.0, 24: 0.3, 41: 0.65, 2: 1.0}


def make_tiny_model(path: str | Path, levels: dict[int, float] | None = None,
                    sharpness: float = 40.0, preprocessing: dict | None = None) -> Path:
    """Write a 3-level, 4-feature model mapping intensity levels to labels (see module doc)."""
    import torch

    from SynthSegMONAILib import ModelInfo, SynthSegUNet, UNetConfig, save_model
    from SynthSegMONAILib.model_file import DEFAULT_PREPROCESSING

    levels = dict(levels or PHANTOM_LEVELS)
    labels = sorted(levels)
    cfg = UNetConfig(out_channels=len(labels), levels=3, features=4)
    net = SynthSegUNet(cfg)
    with torch.no_grad():
        for module in list(net.encoder) + list(net.decoder):
            for conv in (m for m in module.modules() if isinstance(m, torch.nn.Conv3d)):
                conv.weight.zero_()
                c = conv.kernel_size[0] // 2
                conv.weight[0, 0, c, c, c] = 1.0  # channel 0 carries the intensity
                if conv.bias is not None:
                    conv.bias.zero_()
        net.head.weight.zero_()
        for i, lab in enumerate(labels):
            t = levels[lab]
            # argmax of 2 t x - t^2 is the level nearest to x
            net.head.weight[i, 0, 0, 0, 0] = sharpness * 2.0 * t
            net.head.bias[i] = -sharpness * t * t
    prep = dict(DEFAULT_PREPROCESSING)
    prep["flip_averaging"] = False  # keeps left and right where the phantom puts them
    prep.update(preprocessing or {})
    info = ModelInfo(network=cfg, labels=labels, name=Path(path).stem,
                     description="tiny test model (intensity levels to labels)",
                     preprocessing=prep)
    return save_model(path, net, info)


def phantom(shape: tuple[int, int, int], ijk_to_ras: np.ndarray, scale: float = 100.0,
            centre_ras: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Intensities [i, j, k] of a head phantom defined in physical (RAS) space.

    A CSF-level ball of radius 20 mm around ``centre_ras``; inside it a ball of radius 14 mm
    split at the mid-sagittal plane: brightest on the left (R < centre, label 2), less bright
    on the right (label 41).
    """
    ras = voxel_centres_ras(shape, ijk_to_ras) - np.asarray(centre_ras)
    r = np.linalg.norm(ras, axis=-1)
    out = np.zeros(shape, np.float32)
    out[r < 20.0] = PHANTOM_LEVELS[24]
    inner = r < 14.0
    out[inner & (ras[..., 0] < 0)] = PHANTOM_LEVELS[2]
    out[inner & (ras[..., 0] >= 0)] = PHANTOM_LEVELS[41]
    return out * scale


def expected_labels(intensity: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """Labels the tiny model gives a phantom: the label of the nearest level."""
    labels = np.array(sorted(PHANTOM_LEVELS))
    lv = np.array([PHANTOM_LEVELS[lab] for lab in labels]) * scale
    return labels[np.argmin(np.abs(intensity[..., None] - lv), axis=-1)]


def voxel_centres_ras(shape: tuple[int, int, int], ijk_to_ras: np.ndarray) -> np.ndarray:
    """RAS position of each voxel centre, array [i, j, k, 3]."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


# labels placed by label_blocks: a left/right pair with laterality, one without (cerebellar
# white matter), a structure of the module's own terminology (cerebellar cortex) and CSF
BLOCK_LABELS = (17, 53, 7, 46, 8, 24)


def label_blocks(shape: tuple[int, int, int]) -> np.ndarray:
    """Label array [i, j, k] of ``shape`` with one block per label of :data:`BLOCK_LABELS`."""
    out = np.zeros(shape, np.int16)
    n = len(BLOCK_LABELS)
    edges = np.linspace(0, shape[0], n + 1).astype(int)
    j0, j1 = shape[1] // 4, max(shape[1] // 4 + 1, 3 * shape[1] // 4)
    k0, k1 = shape[2] // 4, max(shape[2] // 4 + 1, 3 * shape[2] // 4)
    for label, a, b in zip(BLOCK_LABELS, edges[:-1], edges[1:], strict=True):
        out[a:max(b, a + 1), j0:j1, k0:k1] = label
    return out

