"""Speed, memory and agreement of ``synthseg-monai`` on one scan, each setting in fresh processes.

For each setting (mode x precision x auto-crop) the command line runs ``--runs`` times in a new
process (model load included). Reported per setting, as medians: wall time, CPU time (user +
system, from the OS: a busy machine shows in the wall time, much less in the CPU time), the
stages (from the command's own SYNTHSEG_RESULT line), the network's executed TFLOP and GFLOP/s
as a fraction of the machine's measured GEMM peak, and the largest peak RSS. Every setting is
compared with SynthSeg's own way, float32 on the whole padded volume (``--no-auto-crop``):
voxel agreement of the segmentations, and with ``--labels`` (a FreeSurfer aseg) the mean Dice
and its change. brainchop (``--brainchop``: its command, installed in a separate environment)
runs on the same scan in the same session.

    python benchmarks/benchmark_segment.py --model MODEL.safetensors --image T1.mgz \\
        [--labels aseg.mgz] [--runs 3] [--brainchop /path/to/venv/bin/brainchop]
    # the AVX2 machine kind, emulated on an AVX-512 one (oneDNN, ATen and MKL capped):
    python benchmarks/benchmark_segment.py ... --isa AVX2

Without --model, the random-weight SynthSeg 2.0 reference file beside the repository is
imported (same network and cost as the official weights; its results, and so the agreement
figures, are meaningless). Without --image, a synthetic 256^3 head is used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
REFERENCE_H5 = REPO.parent / "shared" / "reference" / "keras-synthseg" / "synthseg_2.0_random.h5"
CSF = 24
#: oneDNN, ATen and MKL capped to the AVX2 machine kind's instructions
ISA_CAPS = {"AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


@dataclass(frozen=True)
class Setting:
    """One way of running the command line."""

    mode: str  # "default" or "fast"
    precision: str = "float32"
    auto_crop: bool = True

    @property
    def name(self) -> str:
        return f"{self.mode} {self.precision}" + ("" if self.auto_crop else " whole volume")

    def flags(self) -> list[str]:
        return [*(["--fast"] if self.mode == "fast" else []), "--precision", self.precision,
                *([] if self.auto_crop else ["--no-auto-crop"])]


@dataclass
class Measured:
    """The runs of one setting."""

    setting: Setting
    runs: list[dict] = field(default_factory=list)
    network_shape: tuple[int, int, int] = (0, 0, 0)
    tflop: float = 0.0
    segmentation: Path | None = None

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def stage(self, name: str) -> float:
        return statistics.median(r["timings"].get(name, math.nan) for r in self.runs)

    @property
    def peak_gib(self) -> float:
        return max(r["peak_mib"] for r in self.runs) / 1024


# ------------------------------------------------------------------------------ inputs


def synthetic_head(path: Path, size: int = 256) -> Path:
    """A 256^3 1 mm head-like volume: nested ellipsoids with noise."""
    rng = np.random.default_rng(0)
    g = (np.indices((size,) * 3, dtype=np.float32) - size / 2) / (size / 2)
    r = np.sqrt((g[0] / 0.7) ** 2 + (g[1] / 0.85) ** 2 + (g[2] / 0.75) ** 2)
    vol = np.where(r < 1.0, 60, 0) + np.where(r < 0.9, 40, 0) + np.where(r < 0.5, 30, 0)
    vol = vol + rng.normal(0, 5, vol.shape)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def as_nifti(image: Path, work: Path) -> Path:
    """The scan as .nii.gz (brainchop reads NIfTI only); the same voxels and affine."""
    if image.name.endswith((".nii", ".nii.gz")):
        return image
    img = nib.load(str(image))
    out = work / (image.name.split(".")[0] + ".nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), str(out))
    return out


# ------------------------------------------------------------------------------ work and peak


def network_tflop(shape: tuple[int, ...], features: list[int], out_channels: int, convs: int, kernel: int,
                  flip: bool) -> float:
    """TFLOP the engine executes for a network input of ``shape`` (multiply-add = 2).

    Per level, the convolutions at that level's resolution; the decoder's view of the upsampled
    level below as a stride-2 transposed convolution ((K+1)^3 taps at the low resolution: 8/27
    of SynthSeg's full-resolution convolution for K = 3); the 1x1x1 head. The flip pass
    recomputes the top level's skip connection (the first pass stores it).
    """
    k3, up3 = kernel**3, (kernel + 1) ** 3
    voxels = math.prod(shape)
    levels = len(features)
    top_encoder = voxels * k3 * (features[0] + (convs - 1) * features[0] ** 2)
    macs = 0.0
    for i, f in enumerate(features):
        v = voxels / 8**i
        cin = 1 if i == 0 else features[i - 1]
        macs += v * k3 * (cin * f + (convs - 1) * f * f)  # encoder
        if i < levels - 1:
            macs += v * k3 * (f * f + (convs - 1) * f * f) + v / 8 * up3 * features[i + 1] * f  # decoder
    macs += voxels * features[0] * out_channels
    passes = 2 if flip else 1
    return 2 * (passes * macs + (top_encoder if flip else 0)) / 1e12


def gemm_peak_gflops(threads: int, env: dict, dtype: str) -> float:
    """GFLOP/s of a large matrix product (MKL / oneDNN) on ``threads`` threads: the machine's
    practical peak for ``dtype`` under the same instruction-set caps as the runs."""
    code = f"""
import time, torch
torch.set_num_threads({threads})
n = 2048
a = torch.randn(n, n).to(torch.{dtype}); b = torch.randn(n, n).to(torch.{dtype})
for _ in range(3): a @ b
best = 0.0
for _ in range(5):
    t0 = time.perf_counter(); [a @ b for _ in range(5)]; t = (time.perf_counter() - t0) / 5
    best = max(best, 2 * n**3 / t / 1e9)
print(best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run_measured(cmd: list[str], env: dict) -> dict:
    """Wall, CPU (user + system) time and peak RSS of one process, from ``os.wait4``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_parts, err_parts = [], []

    def drain(stream, into):
        into.append(stream.read())

    threads = [threading.Thread(target=drain, args=(proc.stdout, out_parts)),
               threading.Thread(target=drain, args=(proc.stderr, err_parts))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = out_parts[0].decode(errors="replace"), err_parts[0].decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    result = next((json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                   if line.startswith("SYNTHSEG_RESULT ")), {})
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "cpu": usage.ru_utime + usage.ru_stime,
            "peak_mib": usage.ru_maxrss / 1024, "timings": result.get("timings", {})}


# ------------------------------------------------------------------------------ the benchmark


def settings_for(modes: list[str], precisions: list[str]) -> list[Setting]:
    """The whole-volume float32 default run first (the reference), then each asked setting."""
    out = [Setting("default", "float32", auto_crop=False)]
    for mode in modes:
        for precision in precisions:
            s = Setting(mode, precision)
            if s not in out:
                out.append(s)
    return out


def agreement(seg: Path, reference: Path) -> float:
    a, b = np.asanyarray(nib.load(str(seg)).dataobj), np.asanyarray(nib.load(str(reference)).dataobj)
    return float((a == b).mean())


def mean_dice(seg: Path, labels_path: Path, model_labels: list[int]) -> float:
    from SynthSegMONAILib.evaluation import evaluate

    scored = [lab for lab in model_labels if lab != CSF]  # as benchmarks/evaluate_model.py
    return evaluate(nib.load(str(seg)), nib.load(str(labels_path)), "aseg", scored).mean_dice


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model file (default: import the random-weight reference .h5)")
    p.add_argument("--image", help="256^3 1 mm scan (default: a synthetic head)")
    p.add_argument("--labels", help="reference labels of --image (FreeSurfer aseg): mean Dice per setting")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--modes", nargs="+", default=["default", "fast"], choices=("default", "fast"))
    p.add_argument("--precisions", nargs="+", default=None, choices=("float32", "bfloat16"),
                   help="default: float32, and bfloat16 where the CPU has it natively")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: on a GPU, float32 only and no GEMM peak; peak RSS is the host's")
    p.add_argument("--isa", choices=sorted(ISA_CAPS), help="emulate a machine kind by capping the instruction set")
    p.add_argument("--brainchop", help="brainchop's command (in its own environment), run on the same scan")
    p.add_argument("--brainchop-model", default="subcortical")
    p.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    args = p.parse_args(argv)

    import torch

    from SynthSegMONAILib.model_file import read_model_info
    from SynthSegMONAILib.pipeline import Segmenter
    from SynthSegMONAILib.precision import native_bf16_cpu

    env = dict(os.environ, **ISA_CAPS.get(args.isa, {}))
    for k in ISA_CAPS.get(args.isa, {}):
        os.environ[k] = env[k]  # this process's Segmenter (network shapes) and bf16 detection too
    work = Path(tempfile.mkdtemp(prefix="synthseg-bench-"))
    model = args.model
    if not model:
        from SynthSegMONAILib.keras_import import import_keras

        model = str(import_keras(REFERENCE_H5, work / "model.safetensors"))
    image = Path(args.image) if args.image else synthetic_head(work / "head.nii.gz")
    on_cpu = args.device == "cpu"
    native = on_cpu and native_bf16_cpu()
    precisions = args.precisions or (["float32", "bfloat16"] if native else ["float32"])
    if "bfloat16" in precisions and not native:
        print("bfloat16 skipped: only on a CPU with native bf16")
        precisions = [q for q in precisions if q != "bfloat16"]
    info = read_model_info(model)
    cfg = info.network
    if not on_cpu:
        kind = f"{torch.cuda.get_device_name(torch.device(args.device))} ({args.device})"
    elif args.isa:
        kind = f"{args.isa} (emulated: {', '.join(f'{k}={v}' for k, v in ISA_CAPS[args.isa].items())})"
    else:
        kind = torch.backends.cpu.get_cpu_capability() + (" + native bf16" if native else "")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; kind {kind}; threads {args.threads}; "
          f"torch {torch.__version__}; image {image.name} {nib.load(str(image)).shape}", flush=True)
    peaks = {dt: gemm_peak_gflops(args.threads, env, dt) for dt in precisions} if on_cpu else {}
    if peaks:
        print("GEMM peak: " + ", ".join(f"{dt} {v:.0f} GFLOP/s" for dt, v in peaks.items()), flush=True)
    device_flags = ["--cpu"] if on_cpu else ["--device", args.device]

    segmenter = Segmenter(model, device="cpu", threads=args.threads, tune_allocator=False)
    measured: list[Measured] = []
    for s in settings_for(args.modes, precisions):
        m = Measured(s, network_shape=segmenter.network_input_shape(image, auto_crop=s.auto_crop))
        m.tflop = network_tflop(m.network_shape, cfg.level_features(), cfg.out_channels, cfg.convs_per_level,
                                cfg.kernel_size, flip=s.mode == "default" and info.preprocessing.get(
                                    "flip_averaging", True))
        m.segmentation = work / f"seg_{s.mode}_{s.precision}_{int(s.auto_crop)}.nii.gz"
        cmd = [sys.executable, "-m", "SynthSegMONAILib.cli", "--i", str(image), "--o", str(m.segmentation),
               "--model", model, "--threads", str(args.threads), *device_flags, "--progress-lines", *s.flags()]
        for k in range(args.runs):
            r = run_measured(cmd, env)
            m.runs.append(r)
            print(f"  {s.name} run {k + 1}: {r['wall']:.1f} s (CPU {r['user']:.1f} user + {r['sys']:.1f} sys), "
                  f"peak RSS {r['peak_mib']:.0f} MiB, stages "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()), flush=True)
        measured.append(m)

    brainchop = None
    if args.brainchop:
        scan = as_nifti(image, work)
        bc_env = dict(env, PATH=str(Path(args.brainchop).parent) + os.pathsep + env.get("PATH", ""))
        cmd = [args.brainchop, str(scan), "-m", args.brainchop_model, "-o", str(work / "brainchop.nii.gz"),
               "--no-optimize"]
        run_measured(cmd, bc_env)  # its first run compiles and caches its kernels
        brainchop = [run_measured(cmd, bc_env) for _ in range(args.runs)]
        for k, r in enumerate(brainchop):
            print(f"  brainchop ({args.brainchop_model}) run {k + 1}: {r['wall']:.1f} s "
                  f"(CPU {r['user']:.1f} user + {r['sys']:.1f} sys), peak RSS {r['peak_mib']:.0f} MiB", flush=True)

    reference = measured[0]
    dice = {}
    if args.labels:
        dice = {m.setting: mean_dice(m.segmentation, Path(args.labels), info.labels) for m in measured}
    print(f"\n### {cpu_name()}, {args.threads} threads, {kind}; {image.name}; median of {args.runs} runs\n")
    print("| setting | wall | CPU (user+sys) | peak RSS | load | preprocess | network | postprocess | write | "
          "network input | TFLOP | GFLOP/s (% of GEMM peak) | agreement with SynthSeg's whole-volume float32 | "
          "mean Dice (change) |")
    print("|---|" * 1 + "---|" * 13)
    for m in measured:
        net = m.stage("network")
        gflops = m.tflop * 1e3 / net if net else math.nan
        peak = peaks.get(m.setting.precision, math.nan)
        agree = "reference" if m is reference else f"{100 * agreement(m.segmentation, reference.segmentation):.3f} %"
        d = dice.get(m.setting)
        dice_text = "" if d is None else f"{d:.4f}" + ("" if m is reference else f" ({d - dice[reference.setting]:+.4f})")
        print(f"| {m.setting.name} | {m.median('wall'):.1f} s | {m.median('cpu'):.1f} s | {m.peak_gib:.2f} GiB | "
              f"{m.stage('load'):.1f} | {m.stage('preprocess'):.1f} | {net:.1f} | {m.stage('postprocess'):.1f} | "
              f"{m.stage('write'):.1f} | {'x'.join(map(str, m.network_shape))} | {m.tflop:.2f} | "
              f"{gflops:.0f} ({100 * gflops / peak:.0f} %) | {agree} | {dice_text} |")
    if brainchop:
        wall = statistics.median(r["wall"] for r in brainchop)
        cpu = statistics.median(r["cpu"] for r in brainchop)
        peak = max(r["peak_mib"] for r in brainchop) / 1024
        print(f"| brainchop {args.brainchop_model} (MeshNet, tinygrad) | {wall:.1f} s | {cpu:.1f} s | {peak:.2f} GiB |"
              " | | | | | | | | | |")

    # the README's speed table: one row per machine kind
    by_name = {m.setting.name: m for m in measured}
    default = by_name.get("default float32")
    row = [kind]
    for name in ("default float32", "default bfloat16", "fast float32", "fast bfloat16"):
        m = by_name.get(name)
        row.append(f"{m.median('wall'):.1f} s" if m else "n/a")
    if default:
        net = default.stage("network")
        gflops = default.tflop * 1e3 / net
        row += [f"{default.stage('load'):.1f} / {default.stage('preprocess'):.1f} / {net:.1f} / "
                f"{default.stage('postprocess'):.1f} / {default.stage('write'):.1f} s",
                f"{max(m.peak_gib for m in measured if m is not reference):.2f} GiB",
                f"{gflops:.0f} GFLOP/s ({100 * gflops / peaks.get('float32', math.nan):.0f} % of GEMM)"]
    row.append(f"{statistics.median(r['wall'] for r in brainchop):.1f} s" if brainchop else "n/a")
    row.append(f"{reference.median('wall'):.1f} s")
    print("\nREADME row (machine kind | default | default bf16 | fast | fast bf16 | default stages load / preprocess / "
          "network / postprocess / write | peak RSS | network speed | brainchop | SynthSeg's whole volume):")
    print("| " + " | ".join(row) + " |")

    if args.json:
        report = {"machine": cpu_name(), "kind": kind, "threads": args.threads, "image": str(image),
                  "gemm_peak_gflops": peaks,
                  "settings": [{"setting": m.setting.name, "network_input": m.network_shape, "tflop": m.tflop,
                                "runs": m.runs, "dice": dice.get(m.setting),
                                "agreement": None if m is reference else agreement(m.segmentation,
                                                                                  reference.segmentation)}
                               for m in measured],
                  "brainchop": brainchop}
        args.json.write_text(json.dumps(report, indent=1))
        print(f"results saved in: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
