"""The module's settings, kept in the scene's parameter node (saved with the scene)."""

from __future__ import annotations

from .options import DEVICES, OUTPUT_GRIDS, SegmentOptions

INPUT_VOLUME = "InputVolume"
OUTPUT_SEGMENTATION = "OutputSegmentation"
OUTPUT_TABLE = "OutputTable"
OUTPUT_QC_TABLE = "OutputQCTable"
# SynthSeg 2.0's on/off options: parameter name -> SegmentOptions field
FLAGS = {"Parcellation": "parc", "Robust": "robust", "CT": "ct", "QualityControl": "qc"}


def _bool(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    return text.lower() in ("1", "true", "yes", "on")


def load_options(parameter_node) -> SegmentOptions:
    """Options stored in ``parameter_node`` (defaults where a value is missing or invalid)."""
    defaults = SegmentOptions()
    p = parameter_node.GetParameter
    device = p("Device") or defaults.device
    grid = p("OutputGrid") or defaults.output_grid
    try:
        threads = max(0, int(p("Threads") or defaults.threads))
    except ValueError:
        threads = defaults.threads
    return SegmentOptions(
        model=p("Model") or defaults.model,
        fast=_bool(p("Fast"), defaults.fast),
        device=device if device in DEVICES else defaults.device,
        threads=threads,
        output_grid=grid if grid in OUTPUT_GRIDS else defaults.output_grid,
        **{field: _bool(p(name), getattr(defaults, field)) for name, field in FLAGS.items()},
    )


def save_options(parameter_node, options: SegmentOptions) -> None:
    """Write ``options`` into ``parameter_node`` (one Modified event)."""
    was = parameter_node.StartModify()
    try:
        parameter_node.SetParameter("Model", options.model)
        parameter_node.SetParameter("Fast", "true" if options.fast else "false")
        parameter_node.SetParameter("Device", options.device)
        parameter_node.SetParameter("Threads", str(options.threads))
        parameter_node.SetParameter("OutputGrid", options.output_grid)
        for name, field in FLAGS.items():
            parameter_node.SetParameter(name, "true" if getattr(options, field) else "false")
    finally:
        parameter_node.EndModify(was)


def set_defaults(parameter_node) -> None:
    """Fill missing parameters with defaults, keeping what is already there."""
    save_options(parameter_node, load_options(parameter_node))
