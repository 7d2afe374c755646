"""MONAI bundles: a model file as a folder that MONAI's own runner runs.

    synthseg-monai export-bundle --model MODEL --output-dir DIR
    python -m monai.bundle run --config_file DIR/configs/inference.json \\
        --meta_file DIR/configs/metadata.json --bundle_root DIR --input_image SCAN --output_dir OUT

The bundle holds ``configs/metadata.json`` (MONAI's bundle metadata, filled from the model
file), ``configs/inference.json`` (runs this engine's exact pipeline through
:func:`run_inference`), ``configs/train.json`` and ``configs/multi_gpu_train.json`` (the training
command line; the second under ``torchrun``), ``models/model.safetensors`` (never a pickle),
``docs/README.md`` (the model card, from the model's provenance) and ``LICENSE``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .errors import OutputPathError, SynthSegError
from .labels import structure
from .model_file import ModelInfo, check_role, read_model_info
from .output_files import apply_umask
from .resource_files import resource_path

BUNDLE_MODEL = "models/model.safetensors"
LICENSE_NAME = "LICENSE"
SYNTHSEG_PAPER = ("B. Billot, D.N. Greve, O. Puonti, A. Thielscher, K. Van Leemput, B. Fischl, A.V. Dalca, "
                  "J.E. Iglesias. SynthSeg: Segmentation of brain MRI scans of any contrast and resolution "
                  "without retraining. Medical Image Analysis, 2023.")


class BundleRunError(SynthSegError):
    """The bundle's inference did not produce its outputs."""


def run_inference(input_image: str, output_dir: str, model_file: str, fast: bool = False,
                  device: str = "auto") -> Path:
    """What ``inference.json`` runs: the command line on one image (or a folder), volumes included."""
    from .cli import main

    if not input_image:
        raise BundleRunError("set input_image (--input_image SCAN on the monai.bundle command line)")
    out = Path(output_dir)
    args = ["--i", str(input_image), "--o", str(out), "--vol", str(out / "volumes.csv"),
            "--model", str(model_file), "--device", str(device)] + (["--fast"] if fast else [])
    code = main(args)
    if code != 0:
        raise BundleRunError(f"segmentation failed (exit status {code}); see the messages above")
    return out


def metadata(info: ModelInfo) -> dict:
    """``configs/metadata.json``: the fields MONAI's bundle schema asks for, from the model file."""
    import monai

    prov = info.provenance
    labels = {str(i): structure(lab).freesurfer_name for i, lab in enumerate(info.labels)}
    channel_values = {str(i): int(lab) for i, lab in enumerate(info.labels)}
    version = str(prov.get("bundle_version", "0.1.0"))
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20240725.json",
        "version": version,
        "changelog": {version: f"exported by synthseg-monai {__version__} from {info.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        # MONAI renamed optional_packages_version to required_packages_version: both, same content
        "optional_packages_version": _packages(),
        "required_packages_version": _packages(),
        "name": info.name,
        "task": "Brain MRI segmentation of any contrast and resolution into FreeSurfer structures (SynthSeg)",
        "description": info.description or "SynthSeg U-Net",
        "authors": "SynthSeg-MONAI contributors; SynthSeg method by B. Billot et al.",
        "copyright": "Copyright (c) SynthSeg-MONAI contributors",
        "license": "Apache-2.0 (see LICENSE)",
        "data_source": _data_source(prov),
        "data_type": "nibabel",
        "image_classes": "one channel: a brain MRI scan of any contrast and resolution, any intensity range",
        "label_classes": json.dumps(labels),
        "pred_classes": json.dumps(labels),
        "eval_metrics": _eval_metrics(prov),
        "intended_use": "Research only; not for diagnostic use.",
        "references": [SYNTHSEG_PAPER],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                "spatial_shape": ["32*n", "32*n", "32*n"],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                "channel_def": {"0": "image, resampled to 1 mm, RAS, intensities scaled to [0, 1]"}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": len(info.labels),
                "spatial_shape": ["32*n", "32*n", "32*n"], "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": False, "channel_def": labels,
                "label_values": channel_values}}},
        "synthseg_monai": {"network": info.network.to_dict(), "labels": list(info.labels),
                           "synthseg_version": info.synthseg_version, "preprocessing": info.preprocessing},
    }


def _packages() -> dict:
    return {"synthseg-monai": __version__, "nibabel": _version("nibabel"), "safetensors": _version("safetensors")}


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return ""


def _data_source(prov: dict) -> str:
    if prov.get("origin") == "keras-import":
        return "official SynthSeg weights (trained on synthetic images from SynthSeg's label maps)"
    return ("synthetic images generated on the fly from SynthSeg's 20 training label maps "
            "(github BBillot/SynthSeg, data/training_label_maps)")


def _eval_metrics(prov: dict) -> dict:
    metrics = {}
    for resolution, result in prov.get("evaluation", {}).items():
        if isinstance(result, dict) and "mean_dice" in result:
            metrics[f"mean_dice_{resolution}"] = result["mean_dice"]
    rounds = prov.get("rounds", [])
    if rounds and "synthetic_validation" in rounds[-1]:
        metrics["synthetic_validation_mean_dice"] = rounds[-1]["synthetic_validation"].get("mean_dice")
    return metrics


def license_path() -> Path:
    """The project's licence text: installed beside the package, or at the top of the source tree."""
    return resource_path(LICENSE_NAME, Path(__file__).parent, source_relative=LICENSE_NAME)


def inference_config() -> dict:
    """``configs/inference.json``: overridable keys and one expression that runs the engine."""
    return {
        "imports": ["$from SynthSegMONAILib.bundle import run_inference"],
        "bundle_root": ".",
        "input_image": "",
        "output_dir": "$@bundle_root + '/eval'",
        "model_file": "$@bundle_root + '/" + BUNDLE_MODEL + "'",
        "fast": False,
        "device": "auto",
        "run": ["$run_inference(@input_image, @output_dir, @model_file, "
                "fast=@fast, device=@device)"],
    }


def train_config() -> dict:
    """``configs/train.json``: the training command line (SynthSeg 2.0 labels, this bundle's output)."""
    return {
        "imports": ["$from SynthSegMONAITrainingLib.entry import run_or_raise"],
        "bundle_root": ".",
        "label_maps": "",
        "output_dir": "$@bundle_root + '/training'",
        "steps": 505000,
        "crop_size": 160,
        "device": "auto",
        "extra_args": [],
        "train_args": "$['--label-maps', @label_maps, '--output-dir', @output_dir, '--steps', str(@steps), "
                      "'--crop-size', str(@crop_size), '--device', @device, '--synthseg-version', '2.0'] "
                      "+ list(@extra_args)",
        "training": ["$run_or_raise('SynthSegMONAITrainingLib.cli', @train_args)"],
    }


def multi_gpu_train_config() -> dict:
    """``configs/multi_gpu_train.json``: overrides for ``torchrun`` (one process per GPU, NCCL)."""
    return {"device": "cuda", "extra_args": ["--set", "distributed.backend=nccl"]}


def model_card(info: ModelInfo) -> str:
    """``docs/README.md``: the model card, in the form of MONAI's model-zoo cards."""
    prov = info.provenance
    lines = [f"# {info.name}", "", info.description or "SynthSeg U-Net.", "",
             "## Model overview",
             "A 3D U-Net (SynthSeg's: "
             f"{info.network.levels} levels, {info.network.features} features, "
             f"{info.network.convs_per_level} convolutions per level) that segments brain MRI scans of any "
             "contrast and resolution into "
             f"{len(info.labels) - 1} FreeSurfer structures. It runs through SynthSeg-MONAI's pipeline, "
             "which reproduces SynthSeg's: resampling to 1 mm, RAS, intensity scaling, left/right flip "
             "averaging, posterior smoothing and topological postprocessing.", "",
             "## Data", _data_source(prov) + ".", ""]
    rounds = prov.get("rounds", [])
    if rounds:
        lines += ["## Training", "Trained in time-bounded rounds (`train_round.py`), each on one GPU:", "",
                  "| round | device | steps | samples | minutes | crop | batch | loss | lr | synthetic-validation Dice |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(rounds, 1):
            val = r.get("synthetic_validation", {}).get("mean_dice", "")
            lines.append(f"| {i} | {r.get('device', '')} | {r.get('steps', '')} | {r.get('samples', '')} | "
                         f"{r.get('minutes', '')} | {r.get('crop_size', '')} | {r.get('batch_size', '')} | "
                         f"{r.get('loss', '')} | {r.get('lr', '')} | {val} |")
        gpu_minutes = sum(float(r.get("minutes", 0)) for r in rounds)
        lines += ["", f"GPU time in all: {gpu_minutes:.1f} minutes. Generative model: SynthSeg 1.0's "
                  "(random affine and elastic deformation, Gaussian mixture per tissue class, bias field, "
                  "gamma, random resolution and slice thickness), on the GPU.", ""]
    elif prov.get("origin") == "keras-import":
        lines += ["## Training", f"The official SynthSeg weights, imported from `{prov.get('source_file', '')}` "
                  f"(SHA-256 {prov.get('source_sha256', '')}).", ""]
    lines += ["## Input and output",
              "Input: one 3D scan (NIfTI, MGZ or NRRD), any contrast, any resolution.", "",
              "Output: a label volume with FreeSurfer values, posteriors on request, and soft volumes "
              "(CSV, SynthSeg's layout). Channels:", "",
              "| channel | label | structure |", "|---|---|---|"]
    lines += [f"| {i} | {lab} | {structure(lab).freesurfer_name} |" for i, lab in enumerate(info.labels)]
    lines += ["", "## Performance"]
    evaluation = prov.get("evaluation", {})
    if evaluation:
        lines += ["Dice against FreeSurfer's aseg on real T1 scans (31 structures, hemispheres separate, "
                  "default mode; `benchmarks/evaluate_model.py`):", "",
                  "| resolution | mean Dice | scans |", "|---|---|---|"]
        for res, r in evaluation.items():
            if isinstance(r, dict) and "mean_dice" in r:
                lines.append(f"| {res} | {r['mean_dice']:.3f} | {r.get('scans', '')} |")
        per = {res: r.get("dice", {}) for res, r in evaluation.items() if isinstance(r, dict)}
        keys = sorted({int(k) for d in per.values() for k in d})
        if keys:
            lines += ["", "| structure | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
            for k in keys:
                cells = " | ".join(f"{per[res].get(str(k), float('nan')):.3f}" for res in per)
                lines.append(f"| {structure(k).freesurfer_name} | {cells} |")
    else:
        lines.append("No evaluation on real scans is recorded in this model file.")
    lines += ["", "## Resource needs",
              "A 256^3 scan in default mode: about 100 s and under 4 GB of memory on 2 CPU cores; a few "
              "seconds on a GPU.", "",
              "## Commands",
              "```",
              "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
              "    --bundle_root . --input_image SCAN.nii.gz --output_dir OUT [--fast True] [--device cpu]",
              "python -m monai.bundle run training --config_file configs/train.json --meta_file configs/metadata.json \\",
              "    --bundle_root . --label_maps LABEL_MAPS_DIR",
              "torchrun --nproc_per_node=4 -m monai.bundle run training \\",
              "    --config_file \"['configs/train.json','configs/multi_gpu_train.json']\" \\",
              "    --meta_file configs/metadata.json --bundle_root . --label_maps LABEL_MAPS_DIR",
              "```", "",
              "## Known limits",
              "Research use only. Scored against FreeSurfer's automatic segmentation (a silver standard). "
              "Adult brains; lesions, tumours and infant brains were not evaluated.", "",
              "## References", f"- {SYNTHSEG_PAPER}", "",
              "## Licence", "Apache-2.0 (see LICENSE)."]
    return "\n".join(lines) + "\n"


def export_bundle(model: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write the bundle folder for ``model`` (a verified model file); refuses a non-empty folder."""
    model = Path(model)
    info = read_model_info(model)
    check_role(model, info, "segmentation")  # the bundle runs the plain pipeline
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise OutputPathError(f"{out} exists and is not empty: give a new folder for the bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        for name, content in (("metadata.json", metadata(info)), ("inference.json", inference_config()),
                              ("train.json", train_config()), ("multi_gpu_train.json", multi_gpu_train_config())):
            (tmp / "configs" / name).write_text(json.dumps(content, indent=4) + "\n")
        shutil.copyfile(model, tmp / BUNDLE_MODEL)
        (tmp / "docs" / "README.md").write_text(model_card(info))
        shutil.copyfile(license_path(), tmp / LICENSE_NAME)
        for path in tmp.rglob("*"):
            apply_umask(path, 0o777 if path.is_dir() else 0o666)
        apply_umask(tmp, 0o777)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out

