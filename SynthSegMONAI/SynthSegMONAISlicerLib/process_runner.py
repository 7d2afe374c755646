"""Run the engine's command line in a child process: stream its output, cancel it cleanly.

The child is started in a process group (POSIX) / process tree (Windows) of its own, so
cancelling kills it together with anything it started. A reader thread turns each output
line into an event; the caller drains the events with :meth:`ProcessRunner.poll` (the widget
from a QTimer, the scripting API in a loop), so nothing blocks the GUI thread. Cancelling
returns at once: a background thread asks the process tree to stop, kills it after a grace
period, and the final :class:`FinishedEvent` arrives through ``poll`` once it is gone.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from SynthSegMONAILib import protocol


@dataclass(frozen=True)
class ProgressEvent:
    """A ``SYNTHSEG_PROGRESS`` line: overall ``fraction`` (0..1) and the current stage."""

    stage: str
    fraction: float
    image: int = 1
    images: int = 1


@dataclass(frozen=True)
class ResultEvent:
    """A ``SYNTHSEG_RESULT`` line: one image segmented, its output files and volumes."""

    result: protocol.ResultLine


@dataclass(frozen=True)
class ErrorEvent:
    """A ``SYNTHSEG_ERROR`` line or an ``error:`` line on stderr."""

    message: str
    input: str = ""


@dataclass(frozen=True)
class LogEvent:
    """Any other output line."""

    text: str
    stream: str = "stdout"


@dataclass(frozen=True)
class FinishedEvent:
    """The process has ended (``cancelled`` when :meth:`ProcessRunner.cancel` ended it)."""

    returncode: int
    cancelled: bool = False


Event = ProgressEvent | ResultEvent | ErrorEvent | LogEvent | FinishedEvent


def parse_line(line: str, stream: str = "stdout") -> Event:
    """Turn one output line of the engine into an event (never raises)."""
    text = line.rstrip("\r\n")
    parsed = protocol.parse_line(text) if stream == "stdout" else None
    if parsed is not None:
        kind, data = parsed
        if kind == protocol.ERROR_PREFIX:
            return ErrorEvent(str(data.get("message", "")), str(data.get("input", "")))
        if kind == protocol.PROGRESS_PREFIX:
            try:
                fraction = min(1.0, max(0.0, float(data.get("fraction", 0.0))))
                return ProgressEvent(str(data.get("stage", "")), fraction,
                                     int(data.get("image", 1)), int(data.get("images", 1)))
            except (TypeError, ValueError):
                return LogEvent(text, stream)
        if kind == protocol.RESULT_PREFIX:
            try:
                return ResultEvent(protocol.ResultLine.from_payload(data))
            except ValueError:
                return LogEvent(text, stream)
    if stream == "stderr" and text.startswith("error:"):
        return ErrorEvent(text[len("error:"):].strip())
    return LogEvent(text, stream)


@dataclass
class ProcessRunner:
    """One child process running ``command`` with optional extra environment variables."""

    command: Sequence[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _events: queue.Queue = field(default_factory=queue.Queue, init=False, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False, repr=False)
    _cancelled: bool = field(default=False, init=False)
    _finished: bool = field(default=False, init=False)
    _killer: threading.Thread | None = field(default=None, init=False, repr=False)
    _exited: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        """Process id of the child (None before :meth:`start`)."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the child process and the threads that read its output."""
        if self._process is not None:
            raise RuntimeError("the process has already been started")
        environment = dict(os.environ)
        environment.update(self.env or {})
        environment.setdefault("PYTHONUNBUFFERED", "1")
        kwargs: dict = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(
                subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True
        self._process = subprocess.Popen(
            list(self.command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=environment, cwd=self.cwd, text=True,
            encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        for stream_name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            t = threading.Thread(target=self._read, args=(stream, stream_name), daemon=True)
            t.start()
            self._threads.append(t)
        waiter = threading.Thread(target=self._wait, daemon=True)
        waiter.start()

    def _read(self, stream, stream_name: str) -> None:
        for line in iter(stream.readline, ""):
            self._events.put(parse_line(line, stream_name))
        stream.close()

    def _wait(self) -> None:
        assert self._process is not None
        returncode = self._process.wait()
        for t in self._threads:
            t.join()
        with self._lock:
            self._exited = True
            killer = self._killer
        if killer is not None:
            killer.join()  # a cancelled run ends when its whole process tree is gone
        self._events.put(FinishedEvent(returncode, killer is not None))
        self._done.set()

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Events since the last call; waits up to ``timeout`` s for the first one."""
        events: list[Event] = []
        try:
            events.append(self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait())
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        if any(isinstance(e, FinishedEvent) for e in events):
            self._finished = True
        return events

    @property
    def running(self) -> bool:
        """True until the process has ended and its last event has been polled."""
        return self._process is not None and not self._finished

    @property
    def cancelling(self) -> bool:
        """True while a cancelled process tree is still being stopped."""
        return self._cancelled and not self._done.is_set()

    def cancel(self, grace_s: float = 3.0, wait: bool = False) -> None:
        """Stop the child and every process it started.

        Returns at once (unless ``wait``): a background thread sends the polite signal, kills
        what is left after ``grace_s`` seconds, and the :class:`FinishedEvent` (``cancelled``)
        follows through :meth:`poll` once the whole tree is gone.
        """
        with self._lock:
            if self._process is not None and not self._cancelled and not self._exited:
                self._cancelled = True
                killer = threading.Thread(target=kill_process_tree, args=(self._process, grace_s), daemon=True)
                killer.start()
                self._killer = killer
        if wait:
            self.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the process (tree, when cancelled) has ended; False on timeout."""
        if self._process is None:
            return True
        return self._done.wait(timeout)


def kill_process_tree(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate ``process`` and its descendants (asking politely first, then killing)."""
    if sys.platform == "win32":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)],
                       capture_output=True, check=False)
        process.wait()
        return
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _group_alive(pgid):
            if process.poll() is None:
                time.sleep(0.05)
            else:
                time.sleep(0.02)
        if not _group_alive(pgid):
            break
    process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
