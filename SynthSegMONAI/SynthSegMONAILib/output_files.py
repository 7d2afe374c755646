"""All-or-nothing output writing: every file goes to a temporary name, renamed at the end.

Renamed files get the mode any Unix tool would create them with (``0666`` less the umask),
not the ``0600`` of a temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError
from .volume_io import image_suffix


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, base: int = 0o666) -> None:
    """Give ``path`` the mode a new file (``base`` 0o666) or folder (0o777) gets under the umask."""
    os.chmod(path, base & ~current_umask())


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Give ``tmp`` the umask's file mode and rename it to ``final``."""
    apply_umask(tmp)
    os.replace(tmp, final)


@contextmanager
def atomic_output(final: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``final``, renamed to it when the block succeeds, removed otherwise."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(final, suffix), suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (links, ``..`` and relative spellings included)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(inputs: list[Path], outputs: dict[str, Path | None]) -> None:
    """Refuse an output that is an input, and two outputs that are one file.

    ``outputs`` maps the option that named each output (``o``, ``post``...) to its path.
    """
    named = [(k, Path(p)) for k, p in outputs.items() if p is not None]
    for key, path in named:
        for inp in inputs:
            if same_file(path, inp):
                raise OutputPathError(f"--{key} {path} is the input image {inp}: refusing to overwrite it "
                                      "(give the output another name)")
    for i, (k1, p1) in enumerate(named):
        for k2, p2 in named[i + 1:]:
            if same_file(p1, p2):
                raise OutputPathError(f"--{k1} and --{k2} name the same file ({p1}): give each output its own name")


DEFAULT_NAME_MAX = 255
_RANDOM_PART = 8  # characters mkstemp adds


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) takes."""
    probe = Path(folder).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return DEFAULT_NAME_MAX


def check_output_name(final: Path) -> None:
    """Refuse, before any work, an output name longer than its file system allows."""
    length, limit = len(os.fsencode(final.name)), name_max(final.parent)
    if length > limit:
        raise OutputPathError(f"{final}: the file name is {length} bytes long, over the file system's "
                              f"limit of {limit}; choose a shorter name")


def temporary_prefix(final: Path, suffix: str) -> str:
    """``.<final name>.``, shortened so that the temporary name fits the file-name limit too."""
    room = name_max(final.parent) - len(os.fsencode(suffix)) - _RANDOM_PART - 2
    name = final.name
    while name and len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}."


class OutputTransaction:
    """Collects temporary files and renames them to their final names on :meth:`commit`.

    Used as a context manager: leaving the block with an exception removes every
    temporary file, so a failed image leaves nothing half-written behind.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def temporary(self, final: Path) -> Path:
        """A fresh temporary path next to ``final`` (same extension, so writers pick the format)."""
        final = Path(final)
        suffix = image_suffix(final) or final.suffix
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            part = f".part{suffix}"
            fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(final, part), suffix=part, dir=final.parent)
        except OSError as e:
            raise OutputPathError(f"cannot write to {final.parent}: {e.strerror or e}") from e
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        """Move every temporary file to its final name."""
        try:
            for tmp, final in self._pending:
                publish(tmp, final)
        except OSError as e:
            raise OutputPathError(f"cannot write {final}: {e.strerror or e}") from e
        finally:
            self.abort()

    def abort(self) -> None:
        """Delete the temporary files that were not committed."""
        for tmp, _ in self._pending:
            if tmp.exists():
                tmp.unlink()
        self._pending.clear()

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
