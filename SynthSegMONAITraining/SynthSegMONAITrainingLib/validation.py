"""Validation: Dice per structure on synthetic images from held-out maps and on real images.

Synthetic validation samples are drawn with a fixed seed, so every validation sees the same
images (varied contrasts and resolutions). Real validation reads subject folders holding an
image and a FreeSurfer ``aseg``, segments each image with the engine's own pipeline (what
users run) and scores it as ``synthseg-monai evaluate`` does: 77 (WM hypointensities) and
251-255 (corpus callosum) become the white matter of the nearer hemisphere, and labels outside
the model's list (24 for 1.0, 30, 31, 62, 63, 72, 80, 85) are ignored.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from SynthSegMONAILib import SynthSegUNet
from SynthSegMONAILib.evaluation import IGNORE

from .distributed import DistInfo, all_reduce_sum
from .label_maps import LabelMap
from .synthesis import Synthesizer, sample_seed


def dice_sums(pred: torch.Tensor, target: torch.Tensor, n_channels: int) -> torch.Tensor:
    """Per channel: [sum of Dice, number of cases where the structure is present] for one case.

    ``pred``/``target`` hold channel indices; voxels where ``target`` is ``IGNORE`` are skipped.
    """
    keep = target != IGNORE
    p, t = pred[keep], target[keep]
    out = torch.zeros(2, n_channels, dtype=torch.float64)
    ch = torch.arange(n_channels, device=p.device)[:, None]
    pm, tm = p[None] == ch, t[None] == ch
    inter = (pm & tm).sum(1).double().cpu()
    total = (pm.sum(1) + tm.sum(1)).double().cpu()
    present = total > 0
    out[0, present] = 2 * inter[present] / total[present]
    out[1, present] = 1
    return out


def summarise(sums: torch.Tensor, labels: list[int]) -> dict:
    """Dice per label value (structures never present are left out) and their mean (no background)."""
    per = {}
    for i, lab in enumerate(labels):
        if sums[1, i] > 0:
            per[int(lab)] = float(sums[0, i] / sums[1, i])
    fg = [v for k, v in per.items() if k != 0]
    return {"dice": per, "mean_dice": float(np.mean(fg)) if fg else 0.0}


@torch.no_grad()
def validate_synthetic(model: torch.nn.Module, synth: Synthesizer, maps: list[LabelMap], n_samples: int,
                       seed: int, crop, labels: list[int], info: DistInfo, autocast: bool) -> tuple[dict, tuple]:
    """Dice on ``n_samples`` fixed synthetic samples; the ranks share the samples.

    Returns the summary and (image, target, prediction) of this rank's first sample.
    """
    model.eval()
    sums = torch.zeros(2, len(labels), dtype=torch.float64)
    example = None
    for i in range(info.rank, n_samples, info.world_size):
        image, target, _ = synth.sample(maps, sample_seed(seed, i), crop)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(image[None])
        pred = logits.argmax(1)[0]
        sums += dice_sums(pred, target[0], len(labels))
        if example is None:
            example = (image[0].cpu(), target[0].cpu(), pred.cpu())
    sums = all_reduce_sum(sums.to(info.device), info).cpu()
    model.train()
    return summarise(sums, labels), example


@dataclass(frozen=True)
class RealCase:
    """A real image and its FreeSurfer ``aseg``, scored as users' segmentations are."""

    name: str
    image: Path
    labels: Path


def load_real_cases(folder: str, image_name: str, label_name: str, max_subjects: int = 0) -> list[RealCase]:
    """Subject folders of ``folder`` that hold both ``image_name`` and ``label_name``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"real validation folder not found: {folder}")
    cases = [RealCase(sub.name, sub / image_name, sub / label_name)
             for sub in sorted(p for p in root.iterdir() if p.is_dir())
             if (sub / image_name).is_file() and (sub / label_name).is_file()]
    if max_subjects:
        cases = cases[:max_subjects]
    if not cases:
        raise FileNotFoundError(f"no subject folder in {folder} holds {image_name} and {label_name}")
    return cases


def _bare_network(model: torch.nn.Module) -> SynthSegUNet:
    """The :class:`SynthSegUNet` inside a DDP wrapper or a compiled module."""
    while not isinstance(model, SynthSegUNet):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"cannot find the U-Net inside a {type(model).__name__}")
        model = inner
    return model


@torch.no_grad()
def validate_real(model: torch.nn.Module, cases: list[RealCase], labels: list[int], info: DistInfo,
                  preprocessing: dict | None = None) -> dict:
    """Dice on real images through the engine's own pipeline (what users run, default mode):
    the segmentation of each image is scored against its ``aseg`` with
    :func:`SynthSegMONAILib.evaluation.evaluate_files`. The ranks share the cases."""
    from SynthSegMONAILib.evaluation import evaluate_files
    from SynthSegMONAILib.pipeline import Outputs, Segmenter

    segmenter = Segmenter(_bare_network(model), device=str(info.device), labels=labels,
                          preprocessing=preprocessing, name="validation network", tune_allocator=False)
    position = {lab: i for i, lab in enumerate(labels)}
    sums = torch.zeros(2, len(labels), dtype=torch.float64)
    with tempfile.TemporaryDirectory(prefix="synthseg-validation-") as tmp:
        for case in cases[info.rank::info.world_size]:
            seg = Path(tmp) / f"{case.name}_synthseg.nii.gz"
            segmenter.segment(case.image, Outputs(seg))
            scores = evaluate_files(seg, case.labels, "aseg", labels)
            for lab, d in scores.dice.items():
                if lab in position:
                    sums[0, position[lab]] += d
                    sums[1, position[lab]] += 1
    sums = all_reduce_sum(sums.to(info.device), info).cpu()
    return summarise(sums, labels)
