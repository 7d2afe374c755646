"""A model file as plain byte chunks (``NAME.part0``, ``.part1``...) that ``cat`` joins again.

Used where files may not exceed a size (a GPU machine returns files of at most 16 MiB). Each
part is written under a temporary name and renamed; parts left from an earlier, longer write
are removed. The model file's own checksum tells whether the joined parts belong together.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from SynthSegMONAILib.output_files import atomic_output

PART_BYTES = 16 * 2**20


def part_paths(folder: str | os.PathLike, name: str) -> list[Path]:
    """The existing parts of ``name`` in ``folder``, in order."""
    folder = Path(folder)
    parts, i = [], 0
    while (folder / f"{name}.part{i}").is_file():
        parts.append(folder / f"{name}.part{i}")
        i += 1
    return parts


def write_parts(source: str | os.PathLike, folder: str | os.PathLike, name: str,
                part_bytes: int = PART_BYTES) -> list[dict]:
    """Split ``source`` into ``folder/name.partN``; returns each part's file name, size and SHA-256."""
    folder = Path(folder)
    data = Path(source).read_bytes()
    written = []
    for i, start in enumerate(range(0, max(len(data), 1), part_bytes)):
        chunk = data[start:start + part_bytes]
        target = folder / f"{name}.part{i}"
        with atomic_output(target) as tmp:
            tmp.write_bytes(chunk)
        written.append({"file": target.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    for stale in part_paths(folder, name)[len(written):]:
        stale.unlink()
    return written


def join_parts(folder: str | os.PathLike, name: str, output: str | os.PathLike) -> Path:
    """Concatenate ``folder/name.part0...`` into ``output`` (what ``cat name.part* > output`` does)."""
    parts = part_paths(folder, name)
    if not parts:
        raise FileNotFoundError(f"no {name}.part0 in {folder}")
    output = Path(output)
    with atomic_output(output) as tmp, open(tmp, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    return output
