"""The ``synthseg-monai`` command line: SynthSeg's flags, plus model import and evaluation.

    synthseg-monai --i scan.nii.gz --o seg.nii.gz [--vol volumes.csv] ...   (segment)
    synthseg-monai import-keras synthseg_2.0.h5 -o synthseg_2.0.safetensors
    synthseg-monai import-freesurfer $FREESURFER_HOME   (every SynthSeg network FreeSurfer ships)
    synthseg-monai models
    synthseg-monai export-bundle --model MODEL --output-dir BUNDLE
    synthseg-monai evaluate --seg SEG --ref REF [--ref-format aseg|labels] [--csv dice.csv]
    synthseg-monai train --config config.yaml ...   (registered by the training package)

Other installed packages add subcommands through the ``synthseg_monai.subcommands`` entry-point
group (the training package registers ``train``), so the engine never imports them by name.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from . import __version__
from .errors import SynthSegError
from .protocol import ResultLine
from .volume_io import image_suffix, list_images

SUBCOMMANDS = ("segment", "import-keras", "import-freesurfer", "models", "evaluate", "export-bundle")
SUBCOMMAND_GROUP = "synthseg_monai.subcommands"  #: entry points: name -> function(argv) -> exit code

CITATION = (
    "If you use this tool in a publication, please cite:\n"
    "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without retraining\n"
    "B. Billot, D.N. Greve, O. Puonti, A. Thielscher, K. Van Leemput, B. Fischl, A.V. Dalca, J.E. Iglesias\n"
    "Medical Image Analysis, 2023"
)


def segment_parser() -> argparse.ArgumentParser:
    """Options of ``segment`` (SynthSeg_predict's names where they exist)."""
    p = argparse.ArgumentParser(
        prog="synthseg-monai segment",
        description="Segment brain MRI scans of any contrast and resolution (SynthSeg).")
    p.add_argument("--i", required=True, help="image, or folder of images (.nii, .nii.gz, .mgz, .nrrd)")
    p.add_argument("--o", required=True, help="segmentation file, or folder (with a folder input)")
    p.add_argument("--post", help="posteriors file or folder (optional)")
    p.add_argument("--resample", help="resampled image file or folder (written only when resampling)")
    p.add_argument("--vol", help="CSV file of soft volumes in mm^3 (SynthSeg layout)")
    p.add_argument("--crop", type=int, nargs="+", help="centre crop size(s), rounded up to multiples of 32")
    p.add_argument("--fast", action="store_true", help="no flip pass, lighter postprocessing")
    p.add_argument("--channel", type=int, default=None, metavar="N",
                   help="channel of a multi-channel image to segment (0-based; default: the first, as SynthSeg)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (same as --device cpu)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--model", help="model file (.safetensors) or name of an installed model")
    p.add_argument("--v1", action="store_true", help="use the installed SynthSeg 1.0 model")
    p.add_argument("--output-grid", choices=("synthseg", "input"), default="synthseg",
                   help="'synthseg': 1 mm grid as SynthSeg (default); 'input': the input's own voxel grid")
    p.add_argument("--progress-lines", action="store_true",
                   help="print machine-readable SYNTHSEG_PROGRESS/RESULT/ERROR lines on stdout")
    p.add_argument("--slab-memory", type=int, default=None, metavar="MB",
                   help="memory for one slab of network temporaries (default: 256 on the CPU, "
                        "an eighth of the GPU's memory up to 8192 on a GPU)")
    p.add_argument("--no-auto-crop", action="store_true",
                   help="run the network on the whole padded volume, as SynthSeg (default: on the head's "
                        "bounding box plus a margin only; ignored with --crop)")
    p.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                   help="the network's arithmetic: float32 (default, exact), bfloat16 (about twice as fast "
                        "where the CPU or GPU has native bf16; refused elsewhere), auto (bfloat16 where native)")
    g = p.add_argument_group(
        "SynthSeg 2.0 options",
        "As SynthSeg_predict; they need SynthSeg 2.0's networks, installed by synthseg-monai import-freesurfer "
        "$FREESURFER_HOME (the parcellation and QC networks are looked for beside the segmentation model, then "
        "among the installed models). They run SynthSeg's exact geometry: the network sees the whole padded "
        "volume, as with --no-auto-crop.")
    g.add_argument("--parc", action="store_true",
                   help="cortical parcellation: the cortex (labels 3, 42) gets the 68 parcels' labels "
                        "(1001-1035, 2001-2035) in the segmentation, and their volumes follow in the CSV")
    g.add_argument("--robust", action="store_true",
                   help="SynthSeg-robust 2.0 (for clinical scans: low resolution, low contrast); implies --fast")
    g.add_argument("--qc", metavar="FILE", help="CSV file of quality-control scores (one row per image)")
    g.add_argument("--ct", action="store_true", help="CT scans: clip intensities to [0, 80] before normalising")
    return p


def _output_name(inp: Path, out: str | None, tag: str, folder_mode: bool) -> Path | None:
    """SynthSeg's naming: a path without image extension is a folder; ``<name>_<tag><ext>``."""
    if out is None:
        return None
    out_path = Path(out).expanduser()
    if folder_mode or image_suffix(out_path) is None:
        suffix = image_suffix(inp)
        stem = inp.name[: -len(suffix)] if suffix else inp.stem
        suffix = suffix or ".nii.gz"
        return out_path / f"{stem}_{tag}{suffix}"
    return out_path


def _csv_path(vol: str | None) -> Path | None:
    if not vol:
        return None
    path = Path(vol).expanduser()
    return path if path.suffix == ".csv" else path.with_name(path.name + ".csv")


def run_segment(argv: list[str]) -> int:
    """``segment``: returns 0 when every image was segmented, 1 otherwise."""
    from .model_registry import resolve_model
    from .output_files import check_distinct
    from .pipeline import Outputs, Segmenter
    from .progress import Progress
    from .synthseg2_pipeline import ROBUST_CITATION, Options, SynthSeg2Segmenter, robust_model, write_qc_csv
    from .volumes import write_volumes_csv

    args = segment_parser().parse_args(argv)
    inp = Path(args.i).expanduser()
    vol = _csv_path(args.vol)
    options = Options(parc=args.parc, robust=args.robust, qc=args.qc is not None, ct=args.ct)
    if args.qc is not None and not args.qc.endswith(".csv"):
        print("path_qc_scores provided without csv extension. Adding csv extension.", flush=True)
    qc_csv = _csv_path(args.qc)
    fast = args.fast or args.robust  # as SynthSeg_predict: --robust forces --fast

    def outputs_of(image: Path) -> Outputs:
        return Outputs(segmentation=_output_name(image, args.o, "synthseg", folder_mode),
                       posteriors=_output_name(image, args.post, "posteriors", folder_mode),
                       resampled=_output_name(image, args.resample, "resampled", folder_mode))

    def check_outputs(image: Path) -> None:
        out = outputs_of(image)
        check_distinct([image], {"o": out.segmentation, "post": out.posteriors, "resample": out.resampled,
                                 "vol": vol, "qc": qc_csv})

    try:
        if inp.is_dir():
            images = list_images(inp)
            if not images:
                raise SynthSegError(f"{inp}: folder holds no image (.nii, .nii.gz, .mgz, .nrrd)")
            folder_mode = True
            if image_suffix(args.o):
                raise SynthSegError("--o must be a folder when --i is a folder")
            if vol is not None or qc_csv is not None:
                check_distinct(images, {"vol": vol, "qc": qc_csv})
        else:
            if not inp.exists():
                raise SynthSegError(f"{inp}: file not found")
            images, folder_mode = [inp], False
            check_outputs(inp)
        if args.v1 and args.robust:  # as SynthSeg_predict; --parc and --qc run on 1.0's labels
            raise SynthSegError("--v1 cannot be used with --robust: SynthSeg-robust only came out with 2.0")
        model_path = robust_model(args.model) if args.robust else resolve_model(args.model, v1=args.v1)
        device = "cpu" if args.cpu else args.device
        print(f"SynthSeg-MONAI {__version__}: loading {model_path.name}", flush=True)
        if options.any:
            segmenter = SynthSeg2Segmenter(model_path, options, device=device, threads=args.threads,
                                           slab_budget_mb=args.slab_memory, precision=args.precision)
        else:
            segmenter = Segmenter(model_path, device=device, threads=args.threads,
                                  slab_budget_mb=args.slab_memory, precision=args.precision)
    except (SynthSegError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.robust:
        mode = "SynthSeg-robust 2.0"
    else:
        mode = f"SynthSeg {segmenter.info.synthseg_version or segmenter.info.name}" + (" (fast)" if fast else "")
    print(f"{mode} on {segmenter.device}, {__import__('torch').get_num_threads()} threads", flush=True)
    progress = Progress(len(images), lines=args.progress_lines)
    rows, qc_rows, failures = [], [], 0
    for k, image in enumerate(images):
        progress.start_image(k)
        outputs = outputs_of(image)
        t0 = time.perf_counter()
        try:
            check_outputs(image)
            result = segmenter.segment(image, outputs, fast=fast, crop=args.crop,
                                       output_grid=args.output_grid, progress=progress, channel=args.channel,
                                       auto_crop=not args.no_auto_crop)
        except (SynthSegError, MemoryError, RuntimeError) as e:
            failures += 1
            message = str(e) if isinstance(e, SynthSegError) else f"{image}: {type(e).__name__}: {e}"
            progress.message(f"error: {message}", error=True)
            progress.error({"input": str(image), "message": message})
            continue
        rows.append(result.volume_row)
        if result.qc is not None:
            qc_rows.append([result.volume_row[0], *segmenter.qc_row()])
        progress.result(_result_line(image, result, time.perf_counter() - t0).payload())
        for line in _written_lines(result, outputs, time.perf_counter() - t0):
            progress.message(line, error=line.startswith("warning"))
    progress.close()
    if vol is not None and rows:
        try:
            write_volumes_csv(vol, getattr(segmenter, "volume_labels", segmenter.labels), rows)
            print(f"volumes saved in: {vol}", flush=True)
        except SynthSegError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if qc_csv is not None and qc_rows:
        try:
            write_qc_csv(qc_csv, qc_rows)
            print(f"QC scores saved in: {qc_csv}", flush=True)
        except SynthSegError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    if rows:
        print("\n" + (ROBUST_CITATION if args.robust else CITATION), flush=True)
    return 1 if failures else 0


def _result_line(image: Path, result, seconds: float) -> ResultLine:
    """What the ``SYNTHSEG_RESULT`` line says about one segmented image (a pipeline ``Result``)."""
    from .volumes import row_volumes

    volumes, total = row_volumes(result.labels, result.volume_row)
    written = {kind: str(path) for kind, path in result.written.items()}
    return ResultLine(input=str(image), segmentation=written["segmentation"],
                      posteriors=written.get("posteriors"), resampled=written.get("resampled"),
                      labels=[int(v) for v in result.labels[1:]], volumes_mm3=volumes,
                      labels_present=list(result.present),
                      total_intracranial_mm3=total, empty=bool(result.empty), seconds=round(seconds, 2),
                      timings={k: round(v, 3) for k, v in result.timings.items()}, qc=result.qc)


def _written_lines(result, outputs, seconds: float) -> list[str]:
    """What the user is told about one image's outputs."""
    lines = [f"warning: {note}" for note in result.notes]
    lines.append(f"segmentation saved in: {result.written['segmentation']} ({seconds:.1f} s)")
    if "posteriors" in result.written:
        lines.append(f"posteriors saved in: {result.written['posteriors']}")
    if "resampled" in result.written:
        lines.append(f"resampled image saved in: {result.written['resampled']}")
    elif outputs.resampled is not None:
        lines.append(f"resampled image not written: {result.input.name} is already at 1 mm "
                     "(as SynthSeg, --resample writes only resampled images)")
    if result.empty:
        lines.append(f"warning: the segmentation of {result.input.name} is empty: every posterior fell below "
                     "the postprocessing thresholds (is the model trained? is the image a brain scan?)")
    return lines


def run_import_keras(argv: list[str]) -> int:
    """``import-keras``: official SynthSeg .h5 -> model file."""
    from .keras_import_synthseg2 import import_keras_any

    p = argparse.ArgumentParser(prog="synthseg-monai import-keras",
                                description="Convert an official SynthSeg Keras .h5 file into a "
                                            "SynthSeg-MONAI model file (.safetensors): a segmentation network "
                                            "(synthseg_2.0.h5, synthseg_1.0.h5) or SynthSeg 2.0's robust, "
                                            "parcellation or QC network (told apart by their layer names).")
    p.add_argument("h5", help="e.g. $FREESURFER_HOME/models/synthseg_2.0.h5")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--name", help="model name stored in the file (default: the .h5 name)")
    args = p.parse_args(argv)
    try:
        out = import_keras_any(args.h5, args.output, name=args.name)
    except SynthSegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"model saved in: {out}")
    return 0


def run_import_freesurfer(argv: list[str]) -> int:
    """``import-freesurfer``: every official SynthSeg .h5 of a FreeSurfer install -> installed models."""
    import os

    from .keras_import_synthseg2 import FREESURFER_FILES, import_freesurfer
    from .model_registry import user_model_dir

    p = argparse.ArgumentParser(prog="synthseg-monai import-freesurfer",
                                description="Convert the SynthSeg networks FreeSurfer 7.3+ ships ("
                                            + ", ".join(FREESURFER_FILES) + ", those found) into installed "
                                            "models of the same names, so that --robust, --parc, --qc and "
                                            "--v1 find them.")
    p.add_argument("folder", nargs="?", default=os.environ.get("FREESURFER_HOME"),
                   help="FreeSurfer's home or its models folder (default: $FREESURFER_HOME)")
    p.add_argument("--output-dir", default=None, help=f"where to install them (default: {user_model_dir()})")
    args = p.parse_args(argv)
    if not args.folder:
        print("error: give FreeSurfer's folder (FREESURFER_HOME is not set)", file=sys.stderr)
        return 1
    try:
        written = import_freesurfer(args.folder, args.output_dir or user_model_dir())
    except SynthSegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"model saved in: {path}")
    return 0


def run_models(argv: list[str]) -> int:
    """``models``: list installed models and the folders searched."""
    from .model_registry import (
        HOW_TO_GET_A_MODEL_SHORT,
        available_models,
        describe,
        model_search_paths,
        resolve_model,
    )

    argparse.ArgumentParser(prog="synthseg-monai models", description="List installed models.").parse_args(argv)
    print("searched: " + ", ".join(str(p) for p in model_search_paths()))
    if not available_models():
        print("No model is installed.\n" + HOW_TO_GET_A_MODEL_SHORT)
        return 0
    try:
        default = resolve_model()  # what runs without --model
    except SynthSegError:
        default = None
    for m in available_models():
        try:
            info = describe(m.path)
            what = f"{len(info.labels)} labels" if info.role != "qc" else "9 QC scores"
            role = "" if info.role == "segmentation" else f" ({info.role})"
            role += " (default: used without --model)" if m.path == default else ""
            print(f"{m.name}\t{what}{role}\t{info.description}\t{m.path}")
        except SynthSegError as e:
            print(f"{m.name}\tINVALID: {e}")
    return 0


def run_evaluate(argv: list[str]) -> int:
    """``evaluate``: Dice of segmentations against reference labels (files or folders)."""
    from . import evaluation
    from .labels import synthseg_labels

    p = argparse.ArgumentParser(
        prog="synthseg-monai evaluate",
        description="Dice per structure between segmentations and reference label volumes. The "
                    "reference is resampled onto the segmentation's grid (nearest neighbour, by the "
                    "affines). Folders are paired by subject: <name>_synthseg.nii.gz or <name>.nii.gz "
                    "in SEG matches <name>.nii.gz/.mgz or <name>/aseg.mgz in REF.")
    p.add_argument("--seg", required=True, help="segmentation file, or folder of segmentations")
    p.add_argument("--ref", required=True, help="reference label file, or folder (with a folder --seg)")
    p.add_argument("--ref-format", choices=("aseg", "labels"), default="aseg",
                   help="'aseg' (default): FreeSurfer aseg scored as SynthSeg does (77 and 251-255 -> "
                        "cerebral WM, labels outside the model's list ignored); 'labels': values as they are")
    p.add_argument("--v1", action="store_true", help="score SynthSeg 1.0's 32 labels (CSF, 24, ignored)")
    p.add_argument("--csv", help="write Dice per subject and structure to this CSV file")
    args = p.parse_args(argv)
    seg, ref = Path(args.seg).expanduser(), Path(args.ref).expanduser()
    # aseg: the model's structures are scored; labels: every value found is scored
    labels = synthseg_labels("1.0" if args.v1 else "2.0") if args.ref_format == "aseg" else None
    try:
        if seg.is_dir() != ref.is_dir() and seg.exists() and ref.exists():
            raise SynthSegError("--seg and --ref must both be files or both be folders")
        if seg.is_dir():
            results, unmatched = evaluation.evaluate_folders(seg, ref, args.ref_format, labels)
            for path in unmatched:
                print(f"warning: no reference for {path.name}; skipped", file=sys.stderr)
            print(evaluation.format_summary(results))
        else:
            name = evaluation.segmentation_subject(seg) or seg.name
            results = {name: evaluation.evaluate_files(seg, ref, args.ref_format, labels)}
            print(evaluation.format_evaluation(results[name]))
        if args.csv:
            out = evaluation.write_dice_csv(Path(args.csv).expanduser(), results)
            print(f"Dice saved in: {out}")
    except SynthSegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_export_bundle(argv: list[str]) -> int:
    """``export-bundle``: a model file as a MONAI bundle folder."""
    from .bundle import export_bundle
    from .model_registry import resolve_model

    p = argparse.ArgumentParser(prog="synthseg-monai export-bundle",
                                description="Write a MONAI bundle (configs, model, model card, licence) that "
                                            "python -m monai.bundle run ... runs with this engine's pipeline.")
    p.add_argument("--model", help="model file or installed model name (default: the default model)")
    p.add_argument("--output-dir", required=True, help="new (or empty) folder for the bundle")
    args = p.parse_args(argv)
    try:
        out = export_bundle(resolve_model(args.model), Path(args.output_dir).expanduser())
    except (SynthSegError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bundle saved in: {out}\nrun it with: python -m monai.bundle run --config_file {out}/configs/"
          f"inference.json --meta_file {out}/configs/metadata.json --bundle_root {out} --input_image SCAN "
          "--output_dir OUT")
    return 0


def registered_subcommands() -> dict[str, EntryPoint]:
    """Subcommands other installed packages register: name -> entry point (``train``, from training)."""
    return {ep.name: ep for ep in entry_points(group=SUBCOMMAND_GROUP) if ep.name not in SUBCOMMANDS}


def run_registered(entry_point: EntryPoint, argv: list[str]) -> int:
    """Run a registered subcommand; it handles its own signals (``train`` runs under torchrun)."""
    try:
        handler = entry_point.load()
    except (ImportError, AttributeError) as e:
        print(f"error: the {entry_point.name} subcommand cannot be loaded ({e})", file=sys.stderr)
        return 1
    return int(handler(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``synthseg-monai`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"synthseg-monai {__version__}")
        return 0
    registered = registered_subcommands()
    names = (*SUBCOMMANDS, *sorted(registered))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("subcommands: " + ", ".join(names) + "; 'synthseg-monai SUBCOMMAND -h' for options\n")
        print("Segmentation (the default subcommand):")
        print(segment_parser().format_help())
        return 0 if argv else 2
    if argv[0] in registered:
        return run_registered(registered[argv[0]], argv[1:])
    if not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        print(f"error: unknown subcommand {argv[0]!r} (subcommands: {', '.join(names)}; "
              "segmentation needs no subcommand: synthseg-monai --i IN --o OUT)", file=sys.stderr)
        return 2
    command = argv.pop(0) if argv[0] in SUBCOMMANDS else "segment"
    handlers = {"segment": run_segment, "import-keras": run_import_keras, "import-freesurfer": run_import_freesurfer,
                "models": run_models,
                "evaluate": run_evaluate, "export-bundle": run_export_bundle}
    from .interruption import Interrupted, signals_as_exceptions

    with signals_as_exceptions():
        try:
            return handlers[command](argv)
        except Interrupted as e:
            print(f"\ninterrupted ({e}): the outputs being written were removed", file=sys.stderr, flush=True)
            return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
