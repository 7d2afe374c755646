"""Wall time and peak memory of ``synthseg-monai`` on a 256^3 1 mm scan (default and --fast).

Each run is a fresh process (model load included); peak RSS comes from the OS (wait4).
Stage timings come from the command's own SYNTHSEG_RESULT line.

    python benchmarks/benchmark_segment.py --model MODEL.safetensors [--image T1.mgz] [--runs 3]

Without --model, the random-weight SynthSeg 2.0 reference file beside the repository is
imported (same network and cost as the official weights; results are meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
REFERENCE_H5 = REPO.parent / "shared" / "reference" / "keras-synthseg" / "synthseg_2.0_random.h5"


def synthetic_head(path: Path, size: int = 256) -> Path:
    """A 256^3 1 mm head-like volume: nested ellipsoids with noise."""
    rng = np.random.default_rng(0)
    g = (np.indices((size,) * 3, dtype=np.float32) - size / 2) / (size / 2)
    r = np.sqrt((g[0] / 0.7) ** 2 + (g[1] / 0.85) ** 2 + (g[2] / 0.75) ** 2)
    vol = np.where(r < 1.0, 60, 0) + np.where(r < 0.9, 40, 0) + np.where(r < 0.5, 30, 0)
    vol = vol + rng.normal(0, 5, vol.shape)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model file (default: import the random-weight reference .h5)")
    p.add_argument("--image", help="256^3 1 mm scan (default: a synthetic head)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--modes", nargs="+", default=["default", "fast"])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto: where the network runs")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="synthseg-bench-"))
    model = args.model
    if not model:
        from SynthSegMONAILib.keras_import import import_keras

        model = str(import_keras(REFERENCE_H5, work / "model.safetensors"))
    image = args.image or str(synthetic_head(work / "head.nii.gz"))
    shape = nib.load(image).shape
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; threads {args.threads}; device {args.device}; "
          f"image {shape}")
    rows = []
    for mode in args.modes:
        results = []
        for k in range(args.runs):
            cmd = [sys.executable, "-m", "SynthSegMONAILib.cli", "--i", image, "--o", str(work / "seg.nii.gz"),
                   "--model", model, "--threads", str(args.threads), "--device", args.device, "--progress-lines",
                   *(["--fast"] if mode == "fast" else [])]
            # peak RSS via a wrapper that reports the child's rusage
            r = _measure(cmd)
            results.append(r)
            print(f"  {mode} run {k + 1}: {r['wall']:.1f} s, peak RSS {r['peak_mb']:.0f} MiB, "
                  f"stages {r['timings']}", flush=True)
        med = statistics.median(r["wall"] for r in results)
        peak = max(r["peak_mb"] for r in results)
        stages = {s: statistics.median(r["timings"][s] for r in results) for s in results[0]["timings"]}
        rows.append((mode, med, peak, stages))
    print("\n| mode | wall time (median) | peak RSS | load | preprocess | network | postprocess | write |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, med, peak, st in rows:
        print(f"| {mode} | {med:.1f} s | {peak / 1024:.2f} GiB ({peak * 2**20 / 1e9:.2f} GB) | {st['load']:.1f} s | {st['preprocess']:.1f} s | "
              f"{st['network']:.1f} s | {st['postprocess']:.1f} s | {st['write']:.1f} s |")
    return 0


def _measure(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}")
    result = next(json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                  if line.startswith("SYNTHSEG_RESULT "))
    return {"wall": wall, "timings": result["timings"], "peak_mb": usage.ru_maxrss / 1024}


if __name__ == "__main__":
    sys.exit(main())
