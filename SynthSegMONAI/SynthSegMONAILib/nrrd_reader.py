"""NRRD images read without trusting their header: the data files a header names stay within
its own folder, are regular files of the size the header implies, and compressed data is
decompressed no further than the size the header declares.

pynrrd parses the header fields; the voxel data are read here. A detached header (``.nhdr``)
names its data in ``data file:``: one file, ``LIST`` (the names on the header's remaining
lines) or a numbered pattern (``slice%03d.raw 1 40 1``), each relative to the header's folder.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputImageError

MAX_HEADER_BYTES = 4 * 2**20
MAX_DATA_FILES = 65536
_CHUNK = 16 * 2**20

_TYPES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
           "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
NRRD_TYPES = {name: code for code, names in _TYPES.items() for name in names}
ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2",
             "ascii": "ascii", "text": "ascii", "txt": "ascii"}


@dataclass(frozen=True)
class NrrdHeader:
    """A parsed NRRD header and where its data lie, checked before any voxel is read."""

    path: Path
    fields: dict
    sizes: tuple[int, ...]  #: per axis, in the file's order (fastest first)
    dtype: np.dtype
    encoding: str  #: raw, gzip, bzip2 or ascii
    sources: tuple[tuple[Path, int], ...]  #: (file, offset where its part begins) in data order
    line_skip: int
    byte_skip: int
    spatial_axes: tuple[int, ...]  #: axes with a space direction
    affine: np.ndarray  #: voxel (spatial axes) to RAS

    @property
    def values(self) -> int:
        return math.prod(self.sizes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the data as :func:`read_nrrd_data` returns it: spatial axes, then the others."""
        others = [a for a in range(len(self.sizes)) if a not in self.spatial_axes]
        return tuple(self.sizes[a] for a in (*self.spatial_axes, *others))


def _fail(path: Path, why: str) -> InputImageError:
    return InputImageError(f"{path}: {why}")


def _header_lines(path: Path) -> tuple[list[str], list[str], int]:
    """The header's field lines, the ``LIST`` file names (if any) and the header's size in bytes."""
    lines, names, size, listing = [], [], 0, False
    with open(path, "rb") as f:
        while True:
            line = f.readline(MAX_HEADER_BYTES + 1 - size)
            if not line:
                break
            size += len(line)
            if size > MAX_HEADER_BYTES:
                raise _fail(path, f"NRRD header longer than {MAX_HEADER_BYTES // 2**20} MiB")
            text = line.decode("latin-1").rstrip()
            if listing:
                if text:
                    names.append(text)
                continue
            if text == "":
                break
            lines.append(text)
            field, _, value = text.partition(":")
            if field.strip() in ("data file", "datafile") and value.lstrip("=").split()[:1] == ["LIST"]:
                listing = True
    return lines, names, size


def _data_names(value: str, listed: list[str], path: Path) -> list[str]:
    """File names of a ``data file`` field: one name, ``LIST`` or a numbered pattern."""
    parts = value.split()
    if parts[:1] == ["LIST"]:
        if not listed:
            raise _fail(path, "'data file: LIST' without file names")
        return listed
    if len(parts) in (4, 5) and all(p.lstrip("-").isdigit() for p in parts[1:]):
        first, last, step = (int(p) for p in parts[1:4])
        if step == 0 or (last - first) / step < 0 or abs((last - first) // step) + 1 > MAX_DATA_FILES:
            raise _fail(path, f"invalid numbered 'data file' range {first} {last} {step}")
        try:
            return [parts[0] % i for i in range(first, last + (1 if step > 0 else -1), step)]
        except (TypeError, ValueError) as e:
            raise _fail(path, f"invalid 'data file' pattern {parts[0]!r} ({e})") from e
    return [value]


def _confined(folder: Path, name: str, header: Path) -> Path:
    """``name`` resolved in ``folder``; refused when it leaves that folder."""
    try:
        target = Path(os.path.realpath(folder / name))
    except (ValueError, OSError) as e:
        raise _fail(header, f"invalid data file name {name!r} ({e})") from e
    root = Path(os.path.realpath(folder))
    if target == root or root not in target.parents:
        raise _fail(header, f"data file {name!r} is outside the header's folder {root}: refused (a NRRD "
                            "header may only name data files beside it or in its subfolders)")
    return target


def _open_regular(path: Path, header: Path):
    """Open ``path`` for reading only if it is a regular file (never blocks on a FIFO or device)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _fail(header, f"data file {path.name!r} cannot be opened: {e.strerror or e}") from e
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _fail(header, f"data file {path.name!r} is not a regular file (a FIFO, device or folder): "
                            "refused")
    return os.fdopen(fd, "rb")


def read_nrrd_header(path: str | os.PathLike) -> NrrdHeader:
    """Parse a NRRD header and check its data files, reading no voxel."""
    import nrrd

    path = Path(path)
    lines, listed, header_size = _header_lines(path)
    try:
        fields = dict(nrrd.read_header(lines))
    except Exception as e:  # pynrrd raises several types for malformed headers
        raise _fail(path, f"not a readable NRRD header ({type(e).__name__}: {e})") from e
    for key in ("dimension", "type", "encoding", "sizes"):
        if key not in fields:
            raise _fail(path, f"NRRD header without '{key}'")
    sizes = tuple(int(n) for n in np.atleast_1d(fields["sizes"]))
    if len(sizes) != fields["dimension"]:
        raise _fail(path, f"NRRD 'sizes' has {len(sizes)} values for dimension {fields['dimension']}")
    if any(n <= 0 for n in sizes):
        raise _fail(path, f"image has a zero-size or negative dimension (sizes {sizes})")
    code = NRRD_TYPES.get(str(fields["type"]))
    if code is None:
        raise _fail(path, f"unsupported NRRD type {fields['type']!r}")
    encoding = ENCODINGS.get(str(fields["encoding"]).lower())
    if encoding is None:
        raise _fail(path, f"unsupported NRRD encoding {fields['encoding']!r}")
    dtype = np.dtype(code)
    if dtype.itemsize > 1 and encoding != "ascii":
        endian = fields.get("endian")
        if endian not in ("little", "big"):
            raise _fail(path, f"NRRD header needs 'endian: little' or 'endian: big' (found {endian!r})")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    line_skip = int(fields.get("line skip", fields.get("lineskip", 0)))
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", 0)))
    if line_skip < 0 or byte_skip < -1:
        raise _fail(path, f"invalid NRRD line skip {line_skip} or byte skip {byte_skip}")
    if byte_skip == -1 and encoding != "raw":
        raise _fail(path, "NRRD 'byte skip: -1' is supported for raw data only")
    data_field = fields.get("data file", fields.get("datafile"))
    if data_field is None:
        sources: tuple[tuple[Path, int], ...] = ((path, header_size),)
    else:
        names = _data_names(str(data_field), listed, path)
        sources = tuple((_confined(path.parent, n, path), 0) for n in names)
    if math.prod(sizes) % len(sources):
        raise _fail(path, f"{math.prod(sizes)} values cannot be split evenly over {len(sources)} data files")
    spatial, affine = _geometry(fields, path)
    header = NrrdHeader(path, fields, sizes, dtype, encoding, sources, line_skip, byte_skip, spatial, affine)
    if encoding == "raw" and line_skip == 0:
        part = header.values // len(sources) * dtype.itemsize
        for source, offset in sources:
            with _open_regular(source, path) as f:
                size = os.fstat(f.fileno()).st_size - offset
            expected = part + max(byte_skip, 0)
            if size != expected and not (byte_skip == -1 and size >= part):
                raise _fail(path, f"data file {source.name!r} holds {size} bytes of data where the header "
                                  f"declares {expected} ({'x'.join(map(str, sizes))} {fields['type']})")
    else:
        for source, _ in sources:
            _open_regular(source, path).close()
    return header


def _geometry(fields: dict, path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """The spatial axes (those with a space direction) and the RAS affine."""
    dirs = fields.get("space directions")
    if dirs is None:
        raise _fail(path, "NRRD file without 'space directions'")
    try:
        rows = [None if d is None else np.asarray(d, dtype=float) for d in dirs]
    except (TypeError, ValueError) as e:
        raise _fail(path, f"unreadable NRRD 'space directions' ({e})") from e
    spatial = tuple(i for i, d in enumerate(rows) if d is not None and d.size and not np.all(np.isnan(d)))
    if len(rows) != fields["dimension"]:
        raise _fail(path, f"NRRD 'space directions' has {len(rows)} entries for dimension "
                          f"{fields['dimension']}")
    if len(spatial) != 3 or any(rows[i].shape != (3,) for i in spatial):
        if len(spatial) < 3:
            raise _fail(path, f"{len(spatial)}D image (NRRD with {len(spatial)} spatial axes); a 3D volume "
                              "is required")
        raise _fail(path, "NRRD image whose space is not 3D; a 3D volume is required")
    affine = np.eye(4)
    affine[:3, :3] = np.stack([rows[i] for i in spatial], axis=1)
    affine[:3, 3] = np.asarray(fields.get("space origin", np.zeros(3)), dtype=float)
    space = str(fields.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise _fail(path, f"unsupported NRRD space {space!r}")
    return spatial, affine


def _read_part(header: NrrdHeader, source: Path, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of decoded data from one data file, refusing more or less than that."""
    path = header.path
    with _open_regular(source, path) as f:
        f.seek(offset)
        for _ in range(header.line_skip):
            if not f.readline(MAX_HEADER_BYTES):
                raise _fail(path, f"data file {source.name!r} ends within its {header.line_skip} skipped "
                                  "lines")
        if header.encoding == "raw":
            if header.byte_skip == -1:
                f.seek(-nbytes, os.SEEK_END)
            else:
                f.seek(header.byte_skip, os.SEEK_CUR)
            data = f.read(nbytes)
            if len(data) != nbytes:
                raise _fail(path, f"data file {source.name!r} is truncated ({len(data)} of {nbytes} bytes)")
            return data
        if header.encoding == "ascii":  # parsed and counted by the caller
            if os.fstat(f.fileno()).st_size - f.tell() > 64 * nbytes // header.dtype.itemsize + 2**20:
                raise _fail(path, f"text data in {source.name!r} is far longer than the header declares")
            return f.read()
        stream = gzip.GzipFile(fileobj=f) if header.encoding == "gzip" else bz2.BZ2File(f)
        try:
            with stream:
                skip = header.byte_skip
                while skip > 0:
                    got = len(stream.read(min(skip, _CHUNK)))
                    if not got:
                        break
                    skip -= got
                data = stream.read(nbytes)
                extra = stream.read(1)
        except (OSError, EOFError, ValueError) as e:
            raise _fail(path, f"corrupt or truncated compressed data in {source.name!r} ({e})") from e
        if len(data) != nbytes:
            raise _fail(path, f"compressed data in {source.name!r} is truncated ({len(data)} of {nbytes} "
                              "bytes)")
        if extra:
            raise _fail(path, f"compressed data in {source.name!r} is longer than the {nbytes} bytes the "
                              "header declares: refused")
        return data


def read_nrrd_data(header: NrrdHeader) -> np.ndarray:
    """The voxel values, shaped :attr:`NrrdHeader.shape` (spatial axes first), in the stored type."""
    per_file = header.values // len(header.sources)
    nbytes = per_file * header.dtype.itemsize
    parts = []
    for source, offset in header.sources:
        raw = _read_part(header, source, offset, nbytes)
        if header.encoding == "ascii":
            try:
                values = np.array(raw.split(), dtype=np.float64)
            except ValueError as e:
                raise _fail(header.path, f"unreadable text data in {source.name!r} ({e})") from e
            if values.size != per_file:
                raise _fail(header.path, f"text data in {source.name!r} holds {values.size} values where the "
                                         f"header declares {per_file}")
            parts.append(values.astype(header.dtype.newbyteorder("=")))
        else:
            parts.append(np.frombuffer(raw, dtype=header.dtype))
        del raw
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
    data = flat.reshape(header.sizes, order="F")
    others = [a for a in range(len(header.sizes)) if a not in header.spatial_axes]
    return np.transpose(data, (*header.spatial_axes, *others))
