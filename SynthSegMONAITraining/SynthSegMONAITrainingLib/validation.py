"""Validation: Dice per structure on synthetic images from held-out maps and on real images.

Synthetic validation samples are drawn with a fixed seed, so every validation sees the same
images (varied contrasts and resolutions). Real validation reads subject folders holding an
image and a FreeSurfer ``aseg``; labels are mapped as SynthSeg scores them: 77 (WM
hypointensities) and 251-255 (corpus callosum) become the white matter of the nearer
hemisphere, and labels outside the model's list (24 for 1.0, 30, 31, 62, 63, 72, 80, 85) are
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference

# the aseg mapping has one definition, in the engine (re-exported here for existing callers)
from SynthSegMONAILib.evaluation import IGNORE, map_aseg

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


@dataclass
class RealCase:
    """A real image (RAS, [0, 1]) with its mapped labels, cropped to the head."""

    name: str
    image: torch.Tensor  #: (1, X, Y, Z)
    target: torch.Tensor  #: (X, Y, Z) channels or IGNORE


def load_real_cases(folder: str, image_name: str, label_name: str, labels: list[int],
                    max_subjects: int = 0) -> list[RealCase]:
    """Subject folders of ``folder`` that hold both ``image_name`` and ``label_name``."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"real validation folder not found: {folder}")
    cases = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        img_p, lab_p = sub / image_name, sub / label_name
        if not (img_p.is_file() and lab_p.is_file()):
            continue
        img = nib.as_closest_canonical(nib.load(str(img_p)))
        lab = nib.as_closest_canonical(nib.load(str(lab_p)))
        data = np.asanyarray(img.dataobj).astype(np.float32)
        seg = np.rint(np.asanyarray(lab.dataobj)).astype(np.int64)
        if data.shape != seg.shape:
            raise ValueError(f"{sub}: image and labels differ in shape")
        lo, hi = np.percentile(data, [0.5, 99.5])
        data = np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
        target = map_aseg(seg, labels)
        nz = np.nonzero(seg)
        box = tuple(slice(max(int(a.min()) - 8, 0), int(a.max()) + 9) for a in nz)
        cases.append(RealCase(sub.name, torch.from_numpy(np.ascontiguousarray(data[box]))[None],
                              torch.from_numpy(np.ascontiguousarray(target[box]))))
        if max_subjects and len(cases) >= max_subjects:
            break
    if not cases:
        raise FileNotFoundError(f"no subject folder in {folder} holds {image_name} and {label_name}")
    return cases


@torch.no_grad()
def validate_real(model: torch.nn.Module, cases: list[RealCase], roi, labels: list[int], info: DistInfo,
                  autocast: bool) -> dict:
    """Dice on real images (sliding windows of the training crop size); ranks share the cases."""
    model.eval()
    sums = torch.zeros(2, len(labels), dtype=torch.float64)
    for case in cases[info.rank::info.world_size]:
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = sliding_window_inference(case.image[None].to(info.device), roi, 1, model, overlap=0.25)
        pred = logits.argmax(1)[0]
        sums += dice_sums(pred, case.target.to(info.device), len(labels))
    sums = all_reduce_sum(sums.to(info.device), info).cpu()
    model.train()
    return summarise(sums, labels)
