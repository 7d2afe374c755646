"""Accuracy of a model file through the engine's own command line (default mode unless --fast).

Labelled scans (``<shared>/data/eval/labelled/<subject>/T1.mgz`` with FreeSurfer ``aseg.mgz``)
are segmented at 1 mm and as simulated 5 mm thick-slice acquisitions (5 axial slices
averaged), and scored against the aseg with ``SynthSegMONAILib.evaluation`` (SynthSeg's aseg
conventions; the aseg is resampled onto the segmentation's grid). Unlabelled scans
(``<shared>/data/eval/unlabelled/*.nii.gz``) are segmented and checked for plausibility:
non-empty, total intracranial volume, left/right volume ratios.

    python benchmarks/evaluate_model.py --model MODEL.safetensors [--json results.json]
    python benchmarks/evaluate_model.py --model tiny.safetensors --fast --subjects 1 --skip-unlabelled

A default-mode run of one 256^3 scan takes about 100 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from machine import cpu_name

from SynthSegMONAILib.errors import SynthSegError
from SynthSegMONAILib.evaluation import Evaluation, evaluate, structure_name
from SynthSegMONAILib.labels import all_structures, csv_names
from SynthSegMONAILib.model_file import read_model_info
from SynthSegMONAILib.model_registry import resolve_model

REPO = Path(__file__).resolve().parents[1]
THICKNESS = 5
CSF = 24
RATIO_RANGE = (0.8, 1.25)  #: plausible left/right volume ratio of a big structure
BIG_STRUCTURE_MM3 = 3000.0  #: "big": mean of the left and right volumes at least this
TIV_RANGE_CM3 = (1000.0, 2200.0)  #: plausible total intracranial volume of an adult


def default_shared() -> Path:
    """``$SYNTHSEG_MONAI_SHARED``, else the ``shared`` folder beside the repository."""
    return Path(os.environ.get("SYNTHSEG_MONAI_SHARED", REPO.parent / "shared"))


# ---------------------------------------------------------------------------- thick slices

def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs most nearly inferior-superior (slices along it are axial)."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    return int(np.argmax(np.abs(directions[2])))


def thick_slices(img: nib.spatialimages.SpatialImage, thickness: int = THICKNESS,
                 axis: int | None = None) -> nib.Nifti1Image:
    """Simulated thick-slice acquisition: blocks of ``thickness`` slices along ``axis`` (default:
    the axial one) averaged into one slice of ``thickness`` times the voxel size.

    Each thick voxel's centre is the centre of its block, so the volume covers the same physical
    space; the last ``n % thickness`` slices (less than one thick slice) are dropped.
    """
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim != 3:
        raise ValueError(f"a 3D image is needed, not shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    axis = axial_axis(affine) if axis is None else axis
    blocks = data.shape[axis] // thickness
    if blocks == 0:
        raise ValueError(f"axis {axis} has {data.shape[axis]} slices, fewer than {thickness}")
    kept = np.take(data, np.arange(blocks * thickness), axis=axis)
    shape = list(data.shape)
    shape[axis:axis + 1] = [blocks, thickness]
    thick = kept.reshape(shape).mean(axis=axis + 1, dtype=np.float64).astype(np.float32)
    new = affine.copy()
    new[:3, axis] = affine[:3, axis] * thickness
    new[:3, 3] = affine[:3, 3] + affine[:3, axis] * (thickness - 1) / 2
    out = nib.Nifti1Image(thick, new)
    out.set_qform(new, code=1)
    out.set_sform(new, code=1)
    return out


# ---------------------------------------------------------------------------- running

def segment(image: Path, out_dir: Path, model: Path, threads: int, device: str, fast: bool) -> dict:
    """Run the command line on one image: segmentation and volumes CSV paths, wall time."""
    stem = image.name.replace(".nii.gz", "").replace(".mgz", "").replace(".nii", "")
    seg, vol = out_dir / f"{stem}_synthseg.nii.gz", out_dir / f"{stem}_volumes.csv"
    cmd = [sys.executable, "-m", "SynthSegMONAILib.cli", "--i", str(image), "--o", str(seg), "--vol", str(vol),
           "--model", str(model), "--threads", str(threads), "--device", device, *(["--fast"] if fast else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"segmentation of {image} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"segmentation": seg, "volumes": vol, "seconds": seconds}


def labelled_subjects(shared: Path, n: int = 0) -> list[Path]:
    """Subject folders holding ``T1.mgz`` and ``aseg.mgz`` (the first ``n`` if ``n``)."""
    root = shared / "data" / "eval" / "labelled"
    subjects = sorted(p for p in root.iterdir() if (p / "T1.mgz").is_file() and (p / "aseg.mgz").is_file()) \
        if root.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"no labelled subject (T1.mgz + aseg.mgz) under {root}")
    return subjects[:n] if n else subjects


def evaluate_labelled(subjects: list[Path], work: Path, model: Path, labels: list[int], args) -> dict:
    """Per subject and resolution: the evaluation and the segmentation time."""
    results: dict[str, dict] = {}
    for sub in subjects:
        results[sub.name] = {}
        aseg = nib.load(str(sub / "aseg.mgz"))
        thick = work / f"{sub.name}_{THICKNESS}mm.nii.gz"
        nib.save(thick_slices(nib.load(str(sub / "T1.mgz"))), str(thick))
        for resolution, image in (("1mm", sub / "T1.mgz"), (f"{THICKNESS}mm", thick)):
            out = work / sub.name / resolution
            out.mkdir(parents=True, exist_ok=True)
            run = segment(image, out, model, args.threads, args.device, args.fast)
            ev = evaluate(nib.load(str(run["segmentation"])), aseg, "aseg", scored_labels(labels))
            results[sub.name][resolution] = {"evaluation": ev, "seconds": run["seconds"]}
            print(f"  {sub.name} {resolution}: mean Dice {ev.mean_dice:.4f} (merged {ev.mean_merged_dice:.4f}), "
                  f"{run['seconds']:.0f} s", flush=True)
    return results


def scored_labels(labels: list[int]) -> list[int]:
    """The labels scored against an aseg: the model's, less CSF (24).

    FreeSurfer's aseg label 24 is not SynthSeg 2.0's extra-cerebral CSF, so, as SynthSeg's own
    evaluation, the 31 structures of SynthSeg 1.0 (hemispheres separate) are scored; aseg
    voxels of other labels are ignored.
    """
    return [lab for lab in labels if lab != CSF]


def lr_pairs(labels: list[int]) -> list[tuple[int, int]]:
    """(left, right) label pairs present in ``labels``."""
    return [(s.label, s.lr_pair) for s in all_structures()
            if s.laterality == "Left" and s.label in labels and s.lr_pair in labels]


def plausibility(volumes_csv: Path, segmentation: Path, labels: list[int]) -> dict:
    """Total intracranial volume, left/right ratios (flagged when implausible), non-emptiness."""
    with open(volumes_csv, newline="") as f:
        header, *rows = list(csv.reader(f))
    values = dict(zip(header[1:], (float(v) for v in rows[0][1:])))
    by_label = dict(zip(labels[1:], (values[n] for n in csv_names(labels[1:]))))
    tiv = values.get("total intracranial", sum(by_label.values()))
    ratios, flagged = {}, []
    for left, right in lr_pairs(labels):
        name = structure_name(left).removeprefix("Left-")
        if by_label[right] > 0:
            ratio = by_label[left] / by_label[right]
        else:  # n/a when both are empty
            ratio = math.inf if by_label[left] > 0 else math.nan
        ratios[name] = ratio
        big = (by_label[left] + by_label[right]) / 2 >= BIG_STRUCTURE_MM3
        if big and not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            flagged.append(name)
    seg = np.asanyarray(nib.load(str(segmentation)).dataobj)
    foreground = int(np.count_nonzero(seg))
    return {"tiv_mm3": tiv, "tiv_plausible": TIV_RANGE_CM3[0] <= tiv / 1000 <= TIV_RANGE_CM3[1],
            "lr_ratio": ratios, "flagged": flagged, "foreground_voxels": foreground, "non_empty": foreground > 0}


def evaluate_unlabelled(shared: Path, work: Path, model: Path, labels: list[int], args) -> dict:
    """Plausibility of the segmentation of every unlabelled scan."""
    root = shared / "data" / "eval" / "unlabelled"
    scans = sorted(root.glob("*.nii.gz"))
    if not scans:
        raise FileNotFoundError(f"no unlabelled scan (*.nii.gz) in {root}")
    results = {}
    for scan in scans:
        out = work / "unlabelled"
        out.mkdir(parents=True, exist_ok=True)
        run = segment(scan, out, model, args.threads, args.device, args.fast)
        results[scan.name] = dict(plausibility(run["volumes"], run["segmentation"], labels), seconds=run["seconds"])
        r = results[scan.name]
        print(f"  {scan.name}: TIV {r['tiv_mm3'] / 1000:.0f} cm^3, flagged {r['flagged'] or 'none'}, "
              f"{run['seconds']:.0f} s", flush=True)
    return results


# ---------------------------------------------------------------------------- reporting

def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _f(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def labelled_tables(results: dict) -> tuple[str, dict]:
    """Markdown: mean Dice per subject and resolution with overall means; Dice per structure."""
    res = ["1mm", f"{THICKNESS}mm"]
    lines = ["| subject | 1 mm | 5 mm | 1 mm (L/R merged) | 5 mm (L/R merged) | seconds 1 mm | seconds 5 mm |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ev = {k: r[k]["evaluation"] for k in res}
        lines.append(f"| {name} | {_f(ev['1mm'].mean_dice)} | {_f(ev[res[1]].mean_dice)} | "
                     f"{_f(ev['1mm'].mean_merged_dice)} | {_f(ev[res[1]].mean_merged_dice)} | "
                     f"{r['1mm']['seconds']:.0f} | {r[res[1]]['seconds']:.0f} |")
    means = {k: {"mean_dice": _mean(r[k]["evaluation"].mean_dice for r in results.values()),
                 "mean_merged_dice": _mean(r[k]["evaluation"].mean_merged_dice for r in results.values())}
             for k in res}
    lines.append(f"| **mean** | **{_f(means['1mm']['mean_dice'])}** | **{_f(means[res[1]]['mean_dice'])}** | "
                 f"**{_f(means['1mm']['mean_merged_dice'])}** | **{_f(means[res[1]]['mean_merged_dice'])}** | | |")
    structures = sorted({lab for r in results.values() for k in res for lab in r[k]["evaluation"].dice if lab != 0})
    per = {k: {lab: _mean(r[k]["evaluation"].dice.get(lab, math.nan) for r in results.values())
               for lab in structures} for k in res}
    lines += ["", "| structure | 1 mm | 5 mm |", "|---|---|---|"]
    lines += [f"| {structure_name(lab)} | {_f(per['1mm'][lab])} | {_f(per[res[1]][lab])} |" for lab in structures]
    for k in res:
        means[k]["dice"] = {str(lab): per[k][lab] for lab in structures}
    return "\n".join(lines), means


def record_in_model(model: Path, means: dict, scans: int, mode: str) -> None:
    """Write the Dice figures into the model file's provenance (``evaluation``, and the last round's).

    The tensors are kept as stored (a float16 model stays float16); the checksum is renewed.
    """
    import torch
    from safetensors import safe_open

    from SynthSegMONAILib.model_file import load_model, save_model

    with safe_open(str(model), framework="pt") as f:
        dtype = f.get_tensor(next(iter(f.keys()))).dtype
    net, info = load_model(model)
    evaluation = {res: {"mean_dice": round(m["mean_dice"], 4), "mean_merged_dice": round(m["mean_merged_dice"], 4),
                        "dice": {k: round(v, 4) for k, v in m["dice"].items()}, "scans": scans,
                        "structures": len(m["dice"]), "mode": mode,
                        "reference": "FreeSurfer aseg of the labelled T1 scans"}
                  for res, m in means.items()}
    info.provenance["evaluation"] = evaluation
    if info.provenance.get("rounds"):
        info.provenance["rounds"][-1]["real_t1_evaluation"] = {res: e["mean_dice"] for res, e in evaluation.items()}
    save_model(model, net, info, dtype=dtype if dtype in (torch.float16, torch.float32) else torch.float32)


def unlabelled_tables(results: dict, labels: list[int]) -> str:
    """Markdown: per scan TIV, non-empty, flags; then left/right ratios per structure and scan."""
    lines = ["| scan | non-empty | TIV (cm^3) | L/R ratio outside 0.8-1.25 (big structures) | seconds |",
             "|---|---|---|---|---|"]
    for scan, r in results.items():
        tiv = f"{r['tiv_mm3'] / 1000:.0f}" + ("" if r["tiv_plausible"] else " (implausible)")
        flags = ", ".join(f"{n} {r['lr_ratio'][n]:.2f}" for n in r["flagged"]) or "none"
        lines.append(f"| {scan} | {'yes' if r['non_empty'] else '**no**'} | {tiv} | {flags} | {r['seconds']:.0f} |")
    names = [structure_name(left).removeprefix("Left-") for left, _ in lr_pairs(labels)]
    short = [scan.replace(".nii.gz", "") for scan in results]
    lines += ["", "| L/R volume ratio | " + " | ".join(short) + " |", "|---|" + "---|" * len(short)]
    lines += [f"| {n} | " + " | ".join(_f(r["lr_ratio"][n], ".2f") for r in results.values()) + " |" for n in names]
    return "\n".join(lines)


def _json_ready(obj):
    if isinstance(obj, Evaluation):
        return _json_ready(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model file (.safetensors) or installed model name")
    p.add_argument("--shared", type=Path, default=default_shared(),
                   help="shared data folder (default: $SYNTHSEG_MONAI_SHARED or ../shared beside the repository)")
    p.add_argument("--fast", action="store_true", help="segment with --fast (quick checks)")
    p.add_argument("--skip-unlabelled", action="store_true", help="only the labelled scans")
    p.add_argument("--subjects", type=int, default=0, help="only the first N labelled subjects")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--json", type=Path, help="write every result to this JSON file")
    p.add_argument("--keep", type=Path, help="keep the segmentations in this folder (default: a temporary one)")
    p.add_argument("--record-in-model", action="store_true",
                   help="write the Dice figures into the model file's provenance (for its model card)")
    args = p.parse_args(argv)
    try:
        model = resolve_model(args.model)
        labels = read_model_info(model).labels
    except SynthSegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mode = "fast" if args.fast else "default"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; threads {args.threads}; device {args.device}; "
          f"model {model.name} ({len(labels)} labels); mode {mode}", flush=True)
    report: dict = {"machine": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "device": args.device,
                    "model": str(model), "labels": labels, "mode": mode}
    with tempfile.TemporaryDirectory(prefix="synthseg-eval-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("labelled scans:", flush=True)
        labelled = evaluate_labelled(labelled_subjects(args.shared, args.subjects), work, model, labels, args)
        unlabelled = None
        if not args.skip_unlabelled:
            print("unlabelled scans:", flush=True)
            unlabelled = evaluate_unlabelled(args.shared, work, model, labels, args)
    table, means = labelled_tables(labelled)
    print(f"\n### Dice against FreeSurfer aseg ({mode} mode, {model.name})\n")
    print(table)
    report["labelled"] = labelled
    report["labelled_means"] = means
    if args.record_in_model:
        record_in_model(model, means, len(labelled), mode)
        print(f"Dice recorded in the provenance of {model}")
    if unlabelled is not None:
        print(f"\n### Unlabelled scans ({mode} mode)\n")
        print(unlabelled_tables(unlabelled, labels))
        report["unlabelled"] = unlabelled
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(json.dumps(_json_ready(report), indent=1))
        os.replace(tmp_json, args.json)
        print(f"\nresults saved in: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
