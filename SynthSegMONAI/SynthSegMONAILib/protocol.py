"""The lines the command line prints for a parent process (the Slicer module), defined once.

``--progress-lines`` makes the command print ``SYNTHSEG_PROGRESS {json}``, ``SYNTHSEG_RESULT
{json}`` and ``SYNTHSEG_ERROR {json}`` on its standard output. A result line carries all a
parent needs about one segmented image (:class:`ResultLine`: the files written, the labels
present in the segmentation, the model's structure labels and their volumes), so it reads no
other output. Standard library only, so
the Slicer side imports it without PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

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


@dataclass(frozen=True)
class ResultLine:
    """The payload of a ``SYNTHSEG_RESULT`` line: one image segmented.

    Paths are the files actually written (None: not written). ``labels`` are the model's
    structure labels (background left out) in the order of ``volumes_mm3``, the soft volumes
    of the ``--vol`` CSV; ``total_intracranial_mm3`` is None when the model segments no CSF.
    ``labels_present``: the labels that occur in the segmentation file (ascending; with
    ``--parc`` the cortical parcels instead of the cortex). ``empty``: no voxel got a structure. ``qc``: SynthSeg 2.0's QC score of each QC group
    ({group name: score}; None when ``--qc`` was not asked).
    """

    input: str
    segmentation: str
    posteriors: str | None = None
    resampled: str | None = None
    labels: list[int] = field(default_factory=list)
    volumes_mm3: list[float] = field(default_factory=list)
    labels_present: list[int] = field(default_factory=list)
    total_intracranial_mm3: float | None = None
    empty: bool = False
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    qc: dict[str, float] | None = None

    def payload(self) -> dict:
        """The JSON object of the line."""
        return asdict(self)

    @classmethod
    def from_payload(cls, payload: dict) -> ResultLine:
        """Read a result line's payload; ValueError when it lacks a field or a value has the wrong type."""
        def optional(key: str, kind: type):
            value = payload.get(key)
            return None if value is None else kind(value)

        try:
            labels = [int(v) for v in payload.get("labels", [])]
            volumes = [float(v) for v in payload.get("volumes_mm3", [])]
            line = cls(input=str(payload["input"]), segmentation=str(payload["segmentation"]),
                       posteriors=optional("posteriors", str), resampled=optional("resampled", str),
                       labels=labels, volumes_mm3=volumes,
                       labels_present=[int(v) for v in payload.get("labels_present", [])],
                       total_intracranial_mm3=optional("total_intracranial_mm3", float),
                       empty=bool(payload.get("empty", False)), seconds=float(payload.get("seconds", 0.0)),
                       timings={str(k): float(v) for k, v in dict(payload.get("timings", {})).items()},
                       qc=None if payload.get("qc") is None
                       else {str(k): float(v) for k, v in dict(payload["qc"]).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed {RESULT_PREFIX} line: {e!r}") from e
        if len(labels) != len(volumes):
            raise ValueError(f"malformed {RESULT_PREFIX} line: {len(volumes)} volumes for {len(labels)} labels")
        return line
