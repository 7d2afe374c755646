"""``snapshot.png``: middle slices of synthetic samples with targets and predictions, and curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from SynthSegMONAILib.output_files import atomic_output


def _slices(volume: torch.Tensor) -> np.ndarray:
    v = volume.float().numpy()
    return np.rot90(v[:, :, v.shape[2] // 2])


def write_snapshot(path: str | Path, examples: dict[str, tuple], history: list[dict], n_channels: int) -> Path:
    """One figure: a row per example (image, target, prediction), then loss and Dice curves."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = len(examples) + 1
    fig, axes = plt.subplots(rows, 3, figsize=(10, 3.2 * rows), squeeze=False)
    for r, (title, (image, target, pred)) in enumerate(examples.items()):
        axes[r, 0].imshow(_slices(image), cmap="gray")
        axes[r, 0].set_title(f"{title}: image")
        axes[r, 1].imshow(_slices(target), cmap="nipy_spectral", vmin=0, vmax=n_channels - 1,
                          interpolation="nearest")
        axes[r, 1].set_title("target")
        axes[r, 2].imshow(_slices(pred), cmap="nipy_spectral", vmin=0, vmax=n_channels - 1,
                          interpolation="nearest")
        axes[r, 2].set_title("prediction")
        for a in axes[r]:
            a.axis("off")
    train = [h for h in history if "loss" in h]
    val = [h for h in history if "val_mean_dice" in h]
    ax = axes[-1, 0]
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], marker="o" if len(train) < 50 else None)
    ax.set_title("training loss")
    ax.set_xlabel("step")
    ax = axes[-1, 1]
    ax.plot([h["step"] for h in val], [h["val_mean_dice"] for h in val], marker="o", label="synthetic")
    real = [h for h in val if "real_mean_dice" in h]
    if real:
        ax.plot([h["step"] for h in real], [h["real_mean_dice"] for h in real], marker="s", label="real")
    ax.set_ylim(0, 1)
    ax.set_title("validation mean Dice")
    ax.legend()
    axes[-1, 2].axis("off")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    return path
