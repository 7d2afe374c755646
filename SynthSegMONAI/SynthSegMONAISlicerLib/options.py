"""What the user chooses for a segmentation run, and the values each choice may take."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SegmentationError

DEVICES = ("auto", "cpu", "cuda")
OUTPUT_GRIDS = ("input", "synthseg")


@dataclass
class SegmentOptions:
    """What the user chose: model (name or path, '' = default), speed, device, output grid, and
    SynthSeg 2.0's options: cortical parcellation (``--parc``), the robust model (``--robust``),
    CT intensity clipping (``--ct``) and quality control scores (``--qc``)."""

    model: str = ""
    fast: bool = False
    device: str = "auto"
    threads: int = 0
    output_grid: str = "input"
    parc: bool = False
    robust: bool = False
    ct: bool = False
    qc: bool = False

    def engine_flags(self) -> list[str]:
        """The command-line flags of SynthSeg 2.0's options (``--qc`` takes a file: the job adds it)."""
        return [flag for flag, on in (("--parc", self.parc), ("--robust", self.robust), ("--ct", self.ct)) if on]

    def validate(self) -> None:
        """Raise :class:`SegmentationError` for a value outside its choices."""
        if self.device not in DEVICES:
            raise SegmentationError(f"unknown device {self.device!r} (choose one of {', '.join(DEVICES)})")
        if self.output_grid not in OUTPUT_GRIDS:
            raise SegmentationError(f"unknown output grid {self.output_grid!r}")
        if self.threads < 0:
            raise SegmentationError("the number of CPU threads cannot be negative")
