"""One segmentation run: volume node in, segmentation node and volume table out.

:class:`SegmentationJob` is a small state machine (:class:`~.job_state.JobState`: ``idle ->
segmenting -> importing -> done``, or ``cancelling -> cancelled``, or ``failed``). ``start``
checks the input and the model (its header), writes the volume to a private temporary folder
and starts the engine's command line with Slicer's own Python in a child process; ``poll``
streams progress and, once the engine has finished, imports its outputs into the scene: the
label map the engine's result line names, and the volumes that line carries. The temporary
folder is removed whatever happens. Errors leave the scene as it was.

SynthSeg 2.0's options (:class:`~.options.SegmentOptions` ``parc``, ``robust``, ``ct``, ``qc``)
become the engine's ``--parc``, ``--robust``, ``--ct`` and ``--qc <temporary file>``; with the
robust model and no model chosen, the engine picks its robust model (no ``--model``). Parcels
come in as named segments (:mod:`.segmentation_import`), QC scores as a table (:mod:`.qc_table`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SynthSegMONAILib import ResultLine

from .errors import SegmentationError
from .job_state import JobState
from .models import resolve_model
from .options import SegmentOptions
from .process_runner import ErrorEvent, FinishedEvent, LogEvent, ProcessRunner, ProgressEvent, ResultEvent
from .qc_table import fill_qc_table, read_qc_csv
from .segmentation_import import import_labelmap, place_in_subject_hierarchy
from .statistics_table import VolumeReport, fill_table, volume_report
from .volume_export import InputVolumeError, check_input_volume, export_volume

ENGINE_DIR = Path(__file__).resolve().parents[1]  # folder holding SynthSegMONAILib


@dataclass
class SegmentationResult:
    """Nodes the run created or filled, and the volumes it read."""

    segmentation_node: object
    table_node: object
    report: VolumeReport
    model_path: Path | None
    log: list[str] = field(default_factory=list)
    qc_table_node: object | None = None
    qc_scores: dict[str, float] | None = None


def python_executable() -> str:
    """Slicer's own Python (``PythonSlicer``) when available, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class SegmentationJob:
    """Segment ``volume_node`` with ``options``; see the module docstring for the states."""

    def __init__(self, scene, volume_node, options: SegmentOptions | None = None,
                 segmentation_node=None, table_node=None, qc_table_node=None,
                 on_progress: Callable[[float, str], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 temp_root: str | os.PathLike | None = None,
                 python: str | None = None):
        self.scene = scene
        self.volume_node = volume_node
        self.options = options or SegmentOptions()
        self.segmentation_node = segmentation_node
        self.table_node = table_node
        self.qc_table_node = qc_table_node
        self.on_progress = on_progress
        self.on_log = on_log
        self.temp_root = temp_root
        self.python = python or python_executable()
        self.state = JobState.IDLE
        self.error: str = ""
        self.result: SegmentationResult | None = None
        self.temp_dir: Path | None = None
        self.log: list[str] = []
        self._runner: ProcessRunner | None = None
        self._errors: list[str] = []
        self._stderr_tail: list[str] = []
        self._model_path: Path | None = None
        self._results: list[ResultLine] = []  # what the engine's result lines said

    # --- control -------------------------------------------------------------------------
    def start(self) -> None:
        """Check inputs, write the volume, start the engine. Raises SegmentationError."""
        if self.state is not JobState.IDLE:
            raise SegmentationError("this job has already been started")
        try:
            self.options.validate()
            try:
                check_input_volume(self.volume_node)
            except InputVolumeError as e:
                raise SegmentationError(str(e)) from e
            if self._engine_picks_model():
                self._model_path = None
            else:
                self._model_path, _ = resolve_model(self.options.model)  # refuses what is not a model
            self.temp_dir = Path(tempfile.mkdtemp(prefix="SynthSegMONAI-", dir=self.temp_root))
            input_path = self.temp_dir / "input.nii.gz"
            export_volume(self.volume_node, input_path)
            self._runner = ProcessRunner(self.command(input_path), env=self._environment())
            self._runner.start()
        except Exception as e:
            self._fail(str(e) if isinstance(e, SegmentationError) else f"{type(e).__name__}: {e}")
            raise SegmentationError(self.error) from e
        self.state = JobState.SEGMENTING
        self._emit_log(f"Segmenting '{self.volume_node.GetName()}' with model {self.model_name}")
        self._emit_progress(0.0, "starting")

    def _engine_picks_model(self) -> bool:
        """The robust model without a model chosen: the engine finds its robust model itself."""
        return self.options.robust and not self.options.model

    @property
    def model_name(self) -> str:
        """File name of the model run, or what the engine picks."""
        if self._model_path is not None:
            return self._model_path.name
        return "SynthSeg robust (engine's default)" if self.options.robust else "default"

    @property
    def qc_path(self) -> Path | None:
        """The QC CSV the engine writes (None when QC is not asked or before start)."""
        return self.temp_dir / "qc.csv" if self.options.qc and self.temp_dir is not None else None

    def command(self, input_path: Path) -> list[str]:
        """The engine command line for ``input_path`` (outputs go next to it)."""
        assert self.temp_dir is not None
        assert self._model_path is not None or self._engine_picks_model()
        o = self.options
        cmd = [self.python, "-m", "SynthSegMONAILib.cli", "segment",
               "--i", str(input_path), "--o", str(self.temp_dir / "seg.nii.gz")]
        if self._model_path is not None:
            cmd += ["--model", str(self._model_path)]
        cmd += ["--device", o.device, "--output-grid", o.output_grid, "--progress-lines"]
        if o.fast:
            cmd.append("--fast")
        if o.threads > 0:
            cmd += ["--threads", str(o.threads)]
        cmd += o.engine_flags()
        if self.qc_path is not None:
            cmd += ["--qc", str(self.qc_path)]
        return cmd

    def _environment(self) -> dict[str, str]:
        env = {"PYTHONPATH": os.pathsep.join(
            p for p in (str(ENGINE_DIR), os.environ.get("PYTHONPATH", "")) if p)}
        if self.options.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def cancel(self, wait: bool = False) -> None:
        """Stop the engine (and its children); the scene stays unchanged.

        Returns at once: the state is ``CANCELLING`` until :meth:`poll` sees the process tree
        gone, then ``CANCELLED`` (temporary files removed). ``wait=True`` blocks until then.
        """
        if self.state is JobState.SEGMENTING:
            self.state = JobState.CANCELLING
            self._emit_log("Cancelling...")
            assert self._runner is not None
            self._runner.cancel()
        if wait:
            while self.state is JobState.CANCELLING:
                self.poll(0.2)

    @property
    def pid(self) -> int | None:
        """Process id of the engine process (None when not started)."""
        return self._runner.pid if self._runner else None

    @property
    def finished(self) -> bool:
        return self.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

    # --- progress ------------------------------------------------------------------------
    def poll(self, timeout: float = 0.0) -> JobState:
        """Handle the engine's output so far; imports the results once it has ended."""
        if self.state not in (JobState.SEGMENTING, JobState.CANCELLING) or self._runner is None:
            return self.state
        for event in self._runner.poll(timeout):
            if self.state is JobState.CANCELLING:
                if isinstance(event, FinishedEvent):
                    self._cleanup()
                    self.state = JobState.CANCELLED
                    self.error = "Segmentation cancelled."
                    self._emit_log(self.error)
                    break
                continue
            if isinstance(event, ProgressEvent):
                # Keep the last 5 % for importing into the scene.
                self._emit_progress(0.95 * event.fraction, event.stage)
            elif isinstance(event, ResultEvent):
                self._results.append(event.result)
            elif isinstance(event, ErrorEvent):
                self._errors.append(event.message)
                self._emit_log(f"error: {event.message}")
            elif isinstance(event, LogEvent):
                if event.stream == "stderr":
                    self._stderr_tail = (self._stderr_tail + [event.text])[-20:]
                if event.text.strip():
                    self._emit_log(event.text)
            elif isinstance(event, FinishedEvent):
                self._finish(event)
                break
        return self.state

    def wait(self, timeout: float | None = None) -> SegmentationResult:
        """Block until done (scripting); raises SegmentationError on failure or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(wait=True)
                raise SegmentationError(f"segmentation did not finish within {timeout} s")
            self.poll(0.2)
        if self.state is not JobState.DONE:
            raise SegmentationError(self.error)
        assert self.result is not None
        return self.result

    def _finish(self, event: FinishedEvent) -> None:
        if event.cancelled or self.state is not JobState.SEGMENTING:
            return
        if event.returncode != 0:
            message = "; ".join(self._errors) or "\n".join(
                line for line in self._stderr_tail if line.strip())[-2000:]
            self._fail(f"The segmentation engine failed (exit status {event.returncode}): "
                       f"{message or 'no message'}")
            return
        self.state = JobState.IMPORTING
        self._emit_progress(0.95, "importing")
        try:
            self.result = self._import_results()
        except Exception as e:
            self._fail(f"Could not import the results: {e}")
            return
        self._cleanup()
        self.state = JobState.DONE
        self._emit_progress(1.0, "done")
        self._emit_log("Done.")

    def _import_results(self) -> SegmentationResult:
        import nibabel as nib

        assert self.temp_dir is not None
        if not self._results:
            raise ValueError("the engine reported no result")
        line = self._results[-1]
        seg_img = nib.load(line.segmentation)
        labels = np.asarray(seg_img.dataobj)
        if labels.ndim == 4 and labels.shape[3] == 1:
            labels = labels[..., 0]
        labels = np.rint(labels).astype(np.int16)
        report = volume_report(line.labels, line.volumes_mm3, line.total_intracranial_mm3)
        qc_scores = self._qc_scores(line)
        name = self.volume_node.GetName()
        created_seg = self.segmentation_node is None
        seg = import_labelmap(self.scene, labels, np.asarray(seg_img.affine), f"{name} SynthSeg",
                              reference_volume=self.volume_node,
                              segmentation_node=self.segmentation_node,
                              present_labels=line.labels_present or None)
        created_table = self.table_node is None
        created_qc = self.qc_table_node is None
        table = qc_table = None
        try:
            table = fill_table(self.scene, report, f"{name} SynthSeg volumes", self.table_node)
            if qc_scores is not None:
                qc_table = fill_qc_table(self.scene, qc_scores, f"{name} SynthSeg QC", self.qc_table_node)
        except Exception:
            for node, created in ((seg, created_seg), (table, created_table), (qc_table, created_qc)):
                if created and node is not None:
                    self.scene.RemoveNode(node)
            raise
        flags = " ".join(self.options.engine_flags() + (["--qc"] if self.options.qc else []))
        for node in (seg, table, qc_table):
            if node is not None:
                node.SetAttribute("SynthSegMONAI.Model", self.model_name)
                node.SetAttribute("SynthSegMONAI.Options", flags)
                place_in_subject_hierarchy(self.scene, node, self.volume_node)
        self.segmentation_node, self.table_node = seg, table
        if qc_table is not None:
            self.qc_table_node = qc_table
        return SegmentationResult(seg, table, report, self._model_path, list(self.log),
                                  qc_table_node=qc_table, qc_scores=qc_scores)

    def _qc_scores(self, line: ResultLine) -> dict[str, float] | None:
        """QC scores of the result line, else of the QC CSV; None when QC was not asked."""
        if not self.options.qc:
            return None
        if line.qc:
            return dict(line.qc)
        path = self.qc_path
        if path is not None and path.is_file():
            return read_qc_csv(path)
        self._emit_log("warning: quality control was asked but the engine reported no QC scores")
        return None

    # --- helpers -------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        if self._runner is not None and self._runner.running:
            self._runner.cancel(wait=True)
        self._cleanup()
        self.state = JobState.FAILED
        self.error = message
        self._emit_log(f"Failed: {message}")

    def _cleanup(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _emit_progress(self, fraction: float, stage: str) -> None:
        if self.on_progress:
            self.on_progress(fraction, stage)

    def _emit_log(self, text: str) -> None:
        self.log.append(text)
        if self.on_log:
            self.on_log(text)


def segment(scene, volume_node, options: SegmentOptions | None = None, **kwargs) -> SegmentationResult:
    """Blocking convenience: start a job, wait for it, return its result."""
    job = SegmentationJob(scene, volume_node, options, **kwargs)
    job.start()
    return job.wait()
