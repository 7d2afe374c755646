"""Command line of training: ``train.py``, ``synthseg-monai-train`` (also registered as the engine's
``synthseg-monai train`` subcommand) and Slicer's ``--python-script``.

Option names avoid Slicer's own (``--python-script``, ``--no-main-window``, ``--testing``,
``--additional-module-paths``...) so the same arguments work under
``Slicer --no-main-window --python-script train.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, apply_overrides, from_dict, load_config

#: shortcut option -> dotted setting
SHORTCUTS = {
    "label_maps": "data.label_maps",
    "steps": "training.steps",
    "batch_size": "training.batch_size",
    "crop_size": "synthesis.crop_size",
    "lr": "optim.lr",
    "device": "training.device",
    "seed": "training.seed",
    "threads": "training.threads",
    "synthseg_version": "training.synthseg_version",
    "validate_every": "validation.every",
    "checkpoint_every": "training.checkpoint_every",
    "real_validation": "validation.real_images",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (shared by every entry point)."""
    p = argparse.ArgumentParser(
        prog="synthseg-monai train",
        description="Train a SynthSeg U-Net on synthetic images generated from label maps. "
                    "Run with python, torchrun (multi-GPU / multi-node) or Slicer --python-script.")
    p.add_argument("--config", help="YAML or JSON configuration (defaults: SynthSeg 1.0 training)")
    p.add_argument("--output-dir", required=True, help="folder for checkpoints, logs, snapshot and models")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    p.add_argument("--label-maps", help="folder (or glob) of training label maps, or a label-map cache (.npz)")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--batch-size", type=int, help="samples per step and process")
    p.add_argument("--crop-size", type=int, nargs="+", help="crop size (1 or 3 integers)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--seed", type=int, help="base random seed")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads")
    p.add_argument("--synthseg-version", choices=["1.0", "2.0"], help="output labels: 32 (1.0) or 33 (2.0)")
    p.add_argument("--validate-every", type=int, help="validation interval in steps")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint interval in steps")
    p.add_argument("--real-validation", help="folder of subject folders with a real image and its labels")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any setting, e.g. --set synthesis.flip_probability=0.5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resulting configuration and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    items = []
    for opt, key in SHORTCUTS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if opt == "crop_size":
            if len(value) not in (1, 3):
                raise ConfigError("--crop-size takes 1 or 3 integers")
            value = value * 3 if len(value) == 1 else value
            items.append(f"{key}=[{', '.join(str(v) for v in value)}]")
        else:
            items.append(f"{key}={value!s}" if not isinstance(value, str) else f"{key}='{value}'")
    return items + list(args.overrides)


def resolve_config(args: argparse.Namespace):
    """Configuration file (or the run's saved one when resuming) plus overrides."""
    config_path = args.config
    if args.resume and not config_path:
        saved = Path(args.output_dir) / "config.yaml"
        config_path = str(saved) if saved.is_file() else None
    if config_path:
        return load_config(config_path, _overrides(args))
    return from_dict(apply_overrides({}, _overrides(args)))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: bad configuration: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0

    from . import distributed as ddp
    from .loop import TrainingError, train

    info = None
    try:
        info = ddp.setup(cfg.training.device, cfg.distributed.backend, cfg.distributed.timeout_s)
        summary = train(cfg, args.output_dir, resume=args.resume, info=info, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr)
        return 130
    except (TrainingError, ConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        if info is not None and info.distributed:
            ddp.abort(info, str(e))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # unexpected: never leave other ranks waiting
        if info is not None and info.distributed:
            ddp.abort(info, f"{type(e).__name__}: {e}")
        raise
    ddp.cleanup(info)
    if info.is_main:
        out = Path(args.output_dir)
        print(f"training done: {summary['steps']} steps; models saved in: {out / 'best.safetensors'} (best "
              f"validation) and {out / 'last.safetensors'} (last step); metrics in {out / 'metrics.csv'}",
              flush=True)
    return 0
