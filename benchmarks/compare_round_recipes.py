"""Choose the training-round recipe by measurement: a small-scale CPU proxy of a GPU round.

Each candidate recipe (learning rate and schedule, loss, crop size) trains the same small U-Net
for the same number of minutes on 3 mm label maps, then is scored on fixed synthetic
validation images (held-out maps) and on real T1 scans with FreeSurfer labels (subsampled to
3 mm to match). Prints a Markdown table.

    python benchmarks/compare_round_recipes.py --label-maps label_maps.npz \\
        --real ../shared/data/eval/labelled [--minutes 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from machine import cpu_name
from monai.inferers import sliding_window_inference

from SynthSegMONAILib import load_model, synthseg_labels
from SynthSegMONAILib.evaluation import map_aseg
from SynthSegMONAITrainingLib.model_parts import join_parts
from SynthSegMONAITrainingLib.training_round import RoundOptions, run_round
from SynthSegMONAITrainingLib.validation import RealCase, dice_sums, load_real_cases, summarise

#: name -> options changed from the round's defaults
CANDIDATES = {
    "Dice, lr 1e-3, warm-up + cosine": {"loss": "dice"},
    "Dice + CE, lr 1e-3, warm-up + cosine": {"loss": "dice_ce"},
    "Dice + CE, lr 3e-3": {"loss": "dice_ce", "lr": 3e-3},
    "Dice + CE, lr 3e-4": {"loss": "dice_ce", "lr": 3e-4},
    "Dice + CE, constant lr 1e-3": {"loss": "dice_ce", "warmup_fraction": 0.0, "min_lr_ratio": 1.0},
    "Dice + CE, crop 48": {"loss": "dice_ce", "crop_size": 48},
}
PROXY_NETWORK = {"levels": 3, "features": 12}
PROXY_CROP = 32
PROXY_DOWNSAMPLE = 3  #: 3 mm maps and scans


@dataclass
class ProxyCase:
    """A real scan (RAS, [0, 1], cropped to the head) and its mapped labels, at the proxy's voxel size."""

    name: str
    image: torch.Tensor  #: (1, X, Y, Z)
    target: torch.Tensor  #: (X, Y, Z) channel indices or IGNORE


def proxy_case(case: RealCase, labels: list[int], factor: int, multiple: int) -> ProxyCase:
    """A real case subsampled ``factor`` times, cropped to a multiple of the network's size step.

    The proxy network is trained on ``factor`` mm maps, so it is scored on ``factor`` mm scans,
    with sliding windows: not the engine's 1 mm pipeline, which users run and training
    validation uses.
    """
    img = nib.as_closest_canonical(nib.load(str(case.image)))
    lab = nib.as_closest_canonical(nib.load(str(case.labels)))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    seg = np.rint(np.asanyarray(lab.dataobj)).astype(np.int64)
    lo, hi = np.percentile(data, [0.5, 99.5])
    data = np.clip((data - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    target = map_aseg(seg, labels)
    box = tuple(slice(max(int(a.min()) - 8, 0), int(a.max()) + 9) for a in np.nonzero(seg))
    data, target = data[box][::factor, ::factor, ::factor], target[box][::factor, ::factor, ::factor]
    x, y, z = (s - s % multiple for s in target.shape)
    return ProxyCase(case.name, torch.from_numpy(np.ascontiguousarray(data[:x, :y, :z]))[None],
                     torch.from_numpy(np.ascontiguousarray(target[:x, :y, :z])))


@torch.no_grad()
def proxy_real_dice(model: torch.nn.Module, cases: list[ProxyCase], labels: list[int]) -> float:
    """Mean foreground Dice of ``model`` on the proxy cases (sliding windows of the proxy crop)."""
    model.eval()
    sums = torch.zeros(2, len(labels), dtype=torch.float64)
    for case in cases:
        logits = sliding_window_inference(case.image[None], [PROXY_CROP] * 3, 1, model, overlap=0.25)
        sums += dice_sums(logits.argmax(1)[0], case.target, len(labels))
    return summarise(sums, labels)["mean_dice"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-maps", required=True)
    p.add_argument("--real", required=True, help="folder of subject folders with T1.mgz and aseg.mgz")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = p.parse_args()
    labels = synthseg_labels("2.0")
    real = [proxy_case(c, labels, PROXY_DOWNSAMPLE, 2 ** (PROXY_NETWORK["levels"] - 1))
            for c in load_real_cases(args.real, "T1.mgz", "aseg.mgz")]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.minutes} min per candidate; network {PROXY_NETWORK}, {PROXY_DOWNSAMPLE} mm maps, crop {PROXY_CROP}", flush=True)
    rows = []
    for name, change in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as out:
            opts = RoundOptions(output_dir=out, time_budget=args.minutes * 60, label_maps=args.label_maps,
                                init="none", device="cpu", crop_size=PROXY_CROP, seed=7, downsample=PROXY_DOWNSAMPLE,
                                network=PROXY_NETWORK, validation_samples=8, log_every=10,
                                checkpoint_every_s=1e9, progress=False)
            for k, v in change.items():
                setattr(opts, k, v)
            record = run_round(opts)
            model, _ = load_model(join_parts(out, "model.safetensors", Path(out) / "joined.safetensors"))
            real_dice = proxy_real_dice(model, real, labels)
        rows.append((name, record["steps"], record["validation"]["mean_dice"], real_dice))
        print(json.dumps({"candidate": name, "steps": rows[-1][1], "synthetic": rows[-1][2],
                          "real": round(rows[-1][3], 4)}), flush=True)
    print(f"\n| recipe | steps | synthetic validation mean Dice | real T1 mean Dice ({PROXY_DOWNSAMPLE} mm) |")
    print("|---|---|---|---|")
    for name, steps, syn, rl in rows:
        print(f"| {name} | {steps} | {syn:.3f} | {rl:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
