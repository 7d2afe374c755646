"""The lines the command line prints for a parent process (the Slicer module), defined once.

``--progress-lines`` makes the command print ``SYNTHSEG_PROGRESS {json}``, ``SYNTHSEG_RESULT
{json}`` and ``SYNTHSEG_ERROR {json}`` on its standard output. Standard library only, so the
Slicer side imports it without PyTorch.
"""

from __future__ import annotations

import json

PROGRESS_PREFIX = "SYNTHSEG_PROGRESS"
RESULT_PREFIX = "SYNTHSEG_RESULT"
ERROR_PREFIX = "SYNTHSEG_ERROR"


def format_line(prefix: str, payload: dict) -> str:
    """One machine-readable line."""
    return f"{prefix} {json.dumps(payload, sort_keys=True)}"


def parse_line(line: str) -> tuple[str, dict] | None:
    """(prefix, payload) of a machine-readable line, or None for any other line (or a damaged one)."""
    text = line.rstrip("\r\n")
    for prefix in (PROGRESS_PREFIX, RESULT_PREFIX, ERROR_PREFIX):
        if text.startswith(prefix + " "):
            try:
                payload = json.loads(text[len(prefix) + 1:])
            except json.JSONDecodeError:
                return None
            return (prefix, payload) if isinstance(payload, dict) else None
    return None
