"""All-or-nothing output writing: every file goes to a temporary name, renamed at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputPathError
from .volume_io import image_suffix


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
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
        except OSError as e:
            raise OutputPathError(f"cannot write to {final.parent}: {e.strerror or e}") from e
        os.close(fd)
        self._pending.append((Path(tmp), final))
        return Path(tmp)

    def commit(self) -> None:
        """Move every temporary file to its final name."""
        try:
            for tmp, final in self._pending:
                os.replace(tmp, final)
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
