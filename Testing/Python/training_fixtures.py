"""Shared helpers for the training tests: data locations, tiny configurations, runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "SynthSegMONAITraining" / "train.py"
SHARED = REPO.parent / "shared"
LABEL_MAPS = SHARED / "data" / "training_label_maps"
ARRAYS_JSON = SHARED / "reference" / "synthseg_label_arrays.json"

needs_maps = pytest.mark.skipif(not LABEL_MAPS.is_dir(), reason="SynthSeg training label maps not available")


def tiny_args(label_maps: str | Path, output_dir: str | Path, steps: int, **extra: str) -> list[str]:
    """Command-line arguments of a tiny CPU run (3-level, 8-feature U-Net, 32^3 crops of 4 mm maps)."""
    args = ["--label-maps", str(label_maps), "--output-dir", str(output_dir), "--steps", str(steps),
            "--crop-size", "32", "--device", "cpu", "--threads", "1", "--no-progress",
            "--set", "data.downsample=4", "--set", "data.validation_maps=1",
            "--set", "network.levels=3", "--set", "network.features=8",
            "--set", "training.l2_warmup_steps=0", "--set", "validation.samples=1",
            "--set", "training.log_every=5", "--lr", "0.003"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def subset_maps(tmp: Path, names: list[str]) -> Path:
    """A folder of symbolic links to some of the training maps."""
    folder = tmp / "maps"
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / n).symlink_to(LABEL_MAPS / n)
    return folder


def run_train(args: list[str], launcher: list[str] | None = None, timeout: float = 300,
              **popen) -> subprocess.CompletedProcess:
    """Run train.py in a fresh interpreter (optionally under torchrun)."""
    cmd = (launcher or [sys.executable]) + [str(TRAIN_SCRIPT)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO, **popen)
