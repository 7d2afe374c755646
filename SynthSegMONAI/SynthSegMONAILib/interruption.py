"""SIGTERM and SIGINT as an exception, so that an interrupted run removes its temporary files.

``timeout``, batch schedulers and Slicer's Cancel send SIGTERM, whose default action ends the
process at once, leaving the hidden ``.*.part.*`` files of the outputs being written. Raised
as :class:`Interrupted` instead, the signal unwinds the stack: every open
:class:`~.output_files.OutputTransaction` deletes its temporary files on the way out.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Interrupted(BaseException):  # not an Exception: no ``except Exception`` swallows it
    """The process received a termination signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM, SIGINT and SIGHUP raise :class:`Interrupted` (once: later
    signals are ignored, so the clean-up is not cut short). Does nothing off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        if previous[s] is not signal.SIG_IGN:  # e.g. nohup's SIGHUP stays ignored
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, h)
