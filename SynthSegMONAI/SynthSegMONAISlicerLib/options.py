"""What the user chooses for a segmentation run, and the values each choice may take."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SegmentationError

DEVICES = ("auto", "cpu", "cuda")
OUTPUT_GRIDS = ("input", "synthseg")


@dataclass
class SegmentOptions:
    """What the user chose: model (name or path, '' = default), speed, device, output grid."""

    model: str = ""
    fast: bool = False
    device: str = "auto"
    threads: int = 0
    output_grid: str = "input"

    def validate(self) -> None:
        """Raise :class:`SegmentationError` for a value outside its choices."""
        if self.device not in DEVICES:
            raise SegmentationError(f"unknown device {self.device!r} (choose one of {', '.join(DEVICES)})")
        if self.output_grid not in OUTPUT_GRIDS:
            raise SegmentationError(f"unknown output grid {self.output_grid!r}")
        if self.threads < 0:
            raise SegmentationError("the number of CPU threads cannot be negative")
