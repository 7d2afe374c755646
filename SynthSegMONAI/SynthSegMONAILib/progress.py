"""Progress reporting: a tqdm bar on a terminal, or parsable lines for a parent process.

A parent (the Slicer module) runs the command line with ``--progress-lines`` and reads
lines ``SYNTHSEG_PROGRESS {json}``, ``SYNTHSEG_RESULT {json}`` and ``SYNTHSEG_ERROR {json}``
from its standard output.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from .protocol import ERROR_PREFIX, PROGRESS_PREFIX, RESULT_PREFIX, format_line, parse_line

__all__ = ["ERROR_PREFIX", "PROGRESS_PREFIX", "RESULT_PREFIX", "Progress", "format_line", "parse_line"]


class Progress:
    """Reports per-image stage progress as an overall fraction of all images."""

    def __init__(self, n_images: int, lines: bool = False, bar: bool | None = None):
        self.n = max(1, n_images)
        self.lines = lines
        self.image = 0
        show_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=1000, unit="‰", disable=not show_bar or lines, leave=True,
                        bar_format="{l_bar}{bar}| {elapsed}<{remaining}")
        self._last = 0

    def start_image(self, index: int) -> None:
        self.image = index

    def __call__(self, stage: str, fraction: float) -> None:
        overall = (self.image + min(max(fraction, 0.0), 1.0)) / self.n
        if self.lines:
            print(format_line(PROGRESS_PREFIX, {"image": self.image + 1, "images": self.n,
                                                "stage": stage, "fraction": round(overall, 4)}),
                  flush=True)
        ticks = int(overall * 1000)
        if ticks > self._last:
            self.bar.set_description(f"image {self.image + 1}/{self.n}: {stage}")
            self.bar.update(ticks - self._last)
            self._last = ticks

    def message(self, text: str, error: bool = False) -> None:
        """A line for the user, printed above the bar (never on the bar's own line)."""
        stream = sys.stderr if error else sys.stdout
        if self.bar.disable:
            print(text, file=stream, flush=True)
        else:
            self.bar.write(text, file=stream)

    def result(self, payload: dict) -> None:
        if self.lines:
            print(format_line(RESULT_PREFIX, payload), flush=True)

    def error(self, payload: dict) -> None:
        if self.lines:
            print(format_line(ERROR_PREFIX, payload), flush=True)

    def close(self) -> None:
        """End the bar at 100 % (failed images count as done) on a line of its own."""
        if self._last < 1000:
            self.bar.update(1000 - self._last)
            self._last = 1000
        self.bar.close()
