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
from pathlib import Path

import torch
from machine import cpu_name

from SynthSegMONAILib import load_model, synthseg_labels
from SynthSegMONAITrainingLib.distributed import DistInfo
from SynthSegMONAITrainingLib.model_parts import join_parts
from SynthSegMONAITrainingLib.training_round import RoundOptions, run_round
from SynthSegMONAITrainingLib.validation import RealCase, load_real_cases, validate_real

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


def subsample(case: RealCase, factor: int, multiple: int) -> RealCase:
    """A real case at ``factor`` x its voxel size, cropped to a multiple of the network's size step."""
    image, target = case.image[:, ::factor, ::factor, ::factor], case.target[::factor, ::factor, ::factor]
    shape = [s - s % multiple for s in target.shape]
    return RealCase(case.name, image[:, :shape[0], :shape[1], :shape[2]].contiguous(),
                    target[:shape[0], :shape[1], :shape[2]].contiguous())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label-maps", required=True)
    p.add_argument("--real", required=True, help="folder of subject folders with T1.mgz and aseg.mgz")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    args = p.parse_args()
    labels = synthseg_labels("2.0")
    real = [subsample(c, PROXY_DOWNSAMPLE, 2 ** (PROXY_NETWORK["levels"] - 1))
            for c in load_real_cases(args.real, "T1.mgz", "aseg.mgz", labels)]
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
            model.train()  # validate_real switches to eval itself
            scores = validate_real(model, real, [PROXY_CROP] * 3, labels, DistInfo(), False)
        rows.append((name, record["steps"], record["validation"]["mean_dice"], scores["mean_dice"]))
        print(json.dumps({"candidate": name, "steps": rows[-1][1], "synthetic": rows[-1][2],
                          "real": round(rows[-1][3], 4)}), flush=True)
    print(f"\n| recipe | steps | synthetic validation mean Dice | real T1 mean Dice ({PROXY_DOWNSAMPLE} mm) |")
    print("|---|---|---|---|")
    for name, steps, syn, rl in rows:
        print(f"| {name} | {steps} | {syn:.3f} | {rl:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
