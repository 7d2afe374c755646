"""The states of a segmentation run, shared by the job and the widget that shows it."""

from __future__ import annotations

import enum


class JobState(enum.Enum):
    """``idle -> segmenting -> importing -> done``, or ``cancelling -> cancelled``, or ``failed``."""

    IDLE = "idle"
    SEGMENTING = "segmenting"
    IMPORTING = "importing"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    DONE = "done"
    FAILED = "failed"
