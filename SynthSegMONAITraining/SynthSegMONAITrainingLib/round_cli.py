"""Command line of ``train_round.py``: one time-bounded training round."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .training_round import RoundOptions, run_round

LABEL_MAPS_ENV = "SYNTHSEG_MONAI_LABEL_MAPS"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``train_round.py``."""
    d = RoundOptions(output_dir="", time_budget=0, label_maps="")
    p = argparse.ArgumentParser(
        prog="train_round.py",
        description="Train the SynthSeg U-Net for a fixed wall-clock budget: checks first, then training "
                    "with a schedule that ends with the budget; the model is written in 16 MiB parts "
                    "at checkpoints and at the end.")
    p.add_argument("--time-budget", type=float, required=True, help="seconds for the whole round")
    p.add_argument("--output-dir", required=True, help="folder for round.json, metrics.csv, snapshot.png, "
                                                       "model.safetensors.partN")
    p.add_argument("--init", default="default",
                   help="starting model file, 'default' (the shipped default model, Resources/Models/"
                        "synthseg_monai_default.safetensors) or 'none' (random weights)")
    p.add_argument("--label-maps", default=os.environ.get(LABEL_MAPS_ENV, ""),
                   help=f"folder (or glob) of training label maps, or a label-map cache .npz "
                        f"(default: ${LABEL_MAPS_ENV})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--crop-size", type=int, default=d.crop_size, help=f"training crop (default {d.crop_size})")
    p.add_argument("--batch-size", type=int, default=0, help="samples per step (default: from free GPU memory)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--loss", choices=["dice", "dice_ce"], default=d.loss)
    p.add_argument("--compile", choices=["auto", "on", "off"], default=d.compile,
                   help="torch.compile: auto tries it on CUDA and falls back to eager")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss reads (synchronisations)")
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every_s, help="seconds between checkpoints")
    p.add_argument("--validation-maps", type=int, default=d.validation_maps, help="maps held out for validation")
    p.add_argument("--validation-samples", type=int, default=d.validation_samples)
    p.add_argument("--seed", type=int, default=d.seed, help="base seed (default: from the clock; recorded)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (default: PyTorch's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Entry point; returns the exit code (0 when the round finished)."""
    args = build_parser().parse_args(argv)
    if not args.label_maps:
        print(f"error: no label maps: give --label-maps (folder or cache .npz) or set ${LABEL_MAPS_ENV}",
              file=sys.stderr)
        return 2
    if args.batch_size < 0 or args.crop_size < 1 or args.log_every < 1 or args.lr <= 0:
        print("error: --batch-size must be >= 0, --crop-size, --log-every and --lr positive", file=sys.stderr)
        return 2
    opts = RoundOptions(
        output_dir=args.output_dir, time_budget=args.time_budget, label_maps=args.label_maps, init=args.init,
        device=args.device, crop_size=args.crop_size, batch_size=args.batch_size, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_fraction=args.warmup_fraction, loss=args.loss,
        compile=args.compile, log_every=args.log_every, checkpoint_every_s=args.checkpoint_every,
        validation_maps=args.validation_maps, validation_samples=args.validation_samples, seed=args.seed,
        threads=args.threads, progress=not args.quiet)
    from SynthSegMONAILib import ModelFileError

    from .config import ConfigError
    from .label_maps import LabelMapError
    from .loop import TrainingError

    try:
        record = run_round(opts, started)
    except KeyboardInterrupt:
        print("interrupted: the model of the last checkpoint is in the output folder", file=sys.stderr)
        return 130
    except (TrainingError, ConfigError, LabelMapError, ModelFileError, FileNotFoundError, ValueError,
            RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: record[k] for k in ("status", "device", "steps", "samples", "samples_per_s",
                                             "median_step_s", "synthesis_share", "validation") if k in record}))
    return 0
