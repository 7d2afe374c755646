"""The error the Slicer side reports to the user, and the one translation of engine errors into it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import SynthSegMONAILib as engine


class SegmentationError(RuntimeError):
    """Segmentation failed or was refused; the message is meant for the user."""


@contextmanager
def engine_errors() -> Iterator[None]:
    """Raise the engine's errors (``SynthSegError``, messages for users) as :class:`SegmentationError`."""
    try:
        yield
    except engine.SynthSegError as e:
        raise SegmentationError(str(e)) from e
