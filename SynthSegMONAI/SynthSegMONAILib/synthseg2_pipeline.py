"""SynthSeg 2.0's options of ``SynthSeg_predict``: ``--robust``, ``--parc``, ``--qc``, ``--ct``.

:class:`SynthSeg2Segmenter` is the engine's :class:`~.pipeline.Segmenter` (same loading,
preprocessing, postprocessing and writing) with the original's network chain
(``predict_synthseg.py::build_model``, commit 66342c1) in place of the plain network pass,
and its parcellation step after the segmentation's postprocessing (``postprocess``):

- ``--robust``: segmenter -> denoiser -> segmenter2 (:class:`~.synthseg2_networks.RobustSegmenter`),
  no flip pass, no smoothing, ``--fast`` postprocessing.
- ``--parc``: the parcellation U-Net on [image, not cortex, cortex] (cortex: argmax of the chain's
  final tensor is 3 or 42), smoothed unless ``--qc`` is also given; its argmax labels the voxels
  of the final cortex mask (after postprocessing), and its 68 volumes follow the segmentation's
  in the CSV. It runs after the segmentation's postprocessing (:meth:`SynthSeg2Segmenter._label_map`)
  and its output is consumed slab by slab (:func:`streamed_parcellation`).
- ``--v1`` with ``--parc`` or ``--qc``: the same on SynthSeg 1.0's 32 labels (the original's
  volumes then have no total, which moves its cortex-volume index arithmetic).
- ``--qc FILE``: the QC network on the argmax cropped/padded to 224^3 (``MakeShape``), one CSV
  row per image.
- ``--ct``: intensities clipped to [0, 80] before normalising.

Which posteriors feed what follows the original exactly (``Testing/Data/synthseg2/README.md``,
behaviours 7, 8, 9 and 12): with ``--fast`` and ``--parc`` or ``--qc`` the segmentation uses the
UNSMOOTHED softmax, the parcellation's cortex mask the smoothed one's argmax, and the QC the
smoothed argmax without ``--parc`` but the unsmoothed one with it.

Geometry: these modes run SynthSeg's own (the network on the whole padded volume, as
``--no-auto-crop``): the QC input's placement depends on the padded shape.

Memory: every network is streamed in slabs of rows. The U-Nets (segmentation, parcellation, the
robust model's three, its denoiser without top skip connections included) run in
:class:`~.inference.SlabNetwork`, the QC regressor in :class:`~.inference.SlabEncoder`; the
inputs built from label maps (the denoiser's and the QC's one-hot, segmenter2's [image, one-hot])
are made a slab at a time from uint8 maps (:func:`one_hot_input`), and of the robust model's first
two networks only the argmax maps are kept (:func:`streamed_argmax`). :func:`extra_bytes`
estimates what the options add. The
parcellation's 69 posteriors are never stored: until postprocessing only its input's image and
cortex map wait, then each slab the network emits is smoothed with the rows around it
(:func:`smoothed_rows`), masked with the final cortex, renormalised, reduced to its argmax and
added to the parcels' soft sums, then dropped; its top skip connection is recomputed (it has no
posterior buffer to live in).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .errors import ModelFileError
from .inference import BuiltInput, SlabEncoder, SlabNetwork, gaussian_kernel_3d
from .labels import PARCELLATION_LABELS, synthseg_labels
from .memory_estimate import SLAB_FACTOR, check_fits, segmentation_bytes
from .model_file import load_model
from .model_registry import MODEL_SUFFIX, available_models, user_model_dir
from .pipeline import STAGES, Result, Segmenter, _Prepared
from .postprocess import for_row_blocks
from .synthseg2_networks import (
    CORTEX_LABELS,
    DENOISER_GROUPS,
    QC_GROUPS,
    QC_IGNORED_INDEX,
    QC_INPUT_SHAPE,
    QC_NAMES,
    SEGMENTATION_LABELS_2,
    qc_crop_to_shape,
    qc_csv_values,
)
from .volumes import add_running_sums, has_total, soft_volumes, volume_row, write_csv

#: installed model names SynthSeg's script loads from ``<SynthSeg>/models``
ROBUST_MODEL, PARC_MODEL, QC_MODEL = "synthseg_robust_2.0", "synthseg_parc_2.0", "synthseg_qc_2.0"
#: the original's closing citation with ``--robust``
ROBUST_CITATION = (
    "If you use the new robust version of SynthSeg in a publication, please cite:\n"
    "Robust machine learning segmentation for large-scale analysis of heterogeneous clinical brain MRI datasets\n"
    "B. Billot, M. Collin, S.E. Arnold, S. Das, J.E. Iglesias"
)
CT_RANGE = (0.0, 80.0)  #: ``--ct`` clips intensities to this range (``predict_synthseg.py::preprocess``)
#: the segmentation label lists ``--parc`` and ``--qc`` run with: SynthSeg 2.0's, and 1.0's (``--v1``)
SYNTHSEG_LABEL_LISTS = (list(SEGMENTATION_LABELS_2), synthseg_labels("1.0"))


@dataclass(frozen=True)
class Options:
    """SynthSeg 2.0's options for one run."""

    parc: bool = False
    robust: bool = False
    qc: bool = False
    ct: bool = False

    @property
    def any(self) -> bool:
        """Whether any option is on (else the plain pipeline runs)."""
        return self.parc or self.robust or self.qc or self.ct


def _import_hint(name: str) -> str:
    return (f"import it with: synthseg-monai import-freesurfer $FREESURFER_HOME (all of SynthSeg 2.0's "
            f"files), or synthseg-monai import-keras $FREESURFER_HOME/models/{name}.h5 -o "
            f"{user_model_dir() / (name + MODEL_SUFFIX)}")


def companion_model(name: str, beside: Path | None, flag: str) -> Path:
    """The model file ``name`` beside the segmentation model (``beside``), else the installed one."""
    if beside is not None and (beside.parent / (name + MODEL_SUFFIX)).is_file():
        return beside.parent / (name + MODEL_SUFFIX)
    for m in available_models():
        if m.name == name:
            return m.path
    where = f"beside {beside.name} or " if beside is not None else ""
    raise ModelFileError(f"{flag} needs the network {name}{MODEL_SUFFIX} ({where}installed), which was not "
                         f"found; {_import_hint(name)}")


def robust_model(model: str | os.PathLike | None) -> Path:
    """The SynthSeg-robust model file: ``model`` (a path or installed name), or the installed one."""
    from .model_registry import resolve_model

    if model:
        return resolve_model(model)
    return companion_model(ROBUST_MODEL, None, "--robust")


# -- tensors ----------------------------------------------------------------------------------
def streamed_softmax(net: SlabNetwork, x: torch.Tensor | BuiltInput,
                     progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Softmax (X, Y, Z, C) float32 of a U-Net for an input (1, C_in, X, Y, Z), streamed in slabs
    (exact: a whole-volume pass's values); the top skip connection is kept in the output buffer
    when it fits there."""
    n_out = net.model.config.out_channels
    out = net._buffer((*x.shape[2:], n_out), dtype=torch.float32, device=x.device)
    skip0 = net._top_skip_in(out)

    def emit(a: int, b: int, p: torch.Tensor) -> None:
        out[a:b].copy_(p[0].permute(1, 2, 3, 0))

    with torch.no_grad():
        net._pass(x, False, emit, progress, skip0=skip0)
    net.between_stages()
    return out


def streamed_argmax(net: SlabNetwork, x: torch.Tensor | BuiltInput,
                    progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Argmax (X, Y, Z) uint8 of a U-Net's softmax for an input (1, C_in, X, Y, Z), streamed in
    slabs: the softmax is never stored whole (the top skip connection is recomputed)."""
    out = torch.empty(x.shape[2:], dtype=torch.uint8, device=x.device)

    def emit(a: int, b: int, p: torch.Tensor) -> None:
        out[a:b] = p[0].argmax(0)  # first maximum wins, as tf.argmax

    with torch.no_grad():
        net._pass(x, False, emit, progress)
    net.between_stages()  # the pass's freed temporaries go back before the next network's buffers
    return out


def one_hot_input(index: torch.Tensor, depth: int, image: torch.Tensor | None = None) -> BuiltInput:
    """The one-hot (``depth`` channels, float32) of an index map (X, Y, Z), after ``image`` (X, Y, Z)
    as channel 0 when given, as a :class:`BuiltInput`: built a slab of rows at a time."""

    def rows(a: int, b: int) -> torch.Tensor:
        x = one_hot(index[a:b], depth)
        if image is not None:
            x = torch.cat([image[a:b][..., None], x[0].permute(1, 2, 3, 0)], -1).permute(3, 0, 1, 2)[None]
        return x

    return BuiltInput(depth + (image is not None), index.shape, rows, index.device)


def smoothed_argmax(post_xyzc: torch.Tensor, sigma: float, rows: int = 16) -> torch.Tensor:
    """Argmax (X, Y, Z) uint8 of the Gaussian-smoothed posteriors (``layers.GaussianBlur``), computed
    a few rows at a time: the smoothed posteriors are never stored."""
    kernel = gaussian_kernel_3d(sigma).to(post_xyzc.device)
    h = kernel.shape[0] // 2
    n, c = post_xyzc.shape[0], post_xyzc.shape[-1]
    w = kernel[None, None].expand(c, 1, *kernel.shape).contiguous(memory_format=torch.channels_last_3d)
    out = torch.empty(post_xyzc.shape[:3], dtype=torch.uint8, device=post_xyzc.device)
    with torch.no_grad():
        for a in range(0, n, rows):
            b = min(a + rows, n)
            lo, hi = max(a - h, 0), min(b + h, n)
            window = post_xyzc[lo:hi].to(torch.float32).permute(3, 0, 1, 2)[None]
            window = F.pad(window, (0, 0, 0, 0, h - (a - lo), h - (hi - b)))
            y = F.conv3d(window.contiguous(memory_format=torch.channels_last_3d), w, groups=c, padding=(0, h, h))
            out[a:b] = y[0].argmax(0).to(torch.uint8)
    return out


def smoothed_rows(n: int, sigma: float | None, consume: Callable[[int, int, torch.Tensor], None]
                  ) -> Callable[[int, int, torch.Tensor], None]:
    """An ``emit(a, b, slab)`` for :meth:`SlabNetwork._pass` that passes on the rows of an
    ``n``-row stream of (1, C, R, Y, Z) softmax slabs, Gaussian-smoothed (``layers.GaussianBlur``,
    zero padding at the borders, as :meth:`SlabNetwork._smooth`) unless ``sigma`` is None, as
    ``consume(a, b, rows)`` with ``rows`` (b - a, Y, Z, C) float32, in order.

    Only the rows of the slab at hand and the kernel radius before and after it are held: a
    smoothed row waits for the first rows of the next slab."""
    if not sigma:
        return lambda a, b, p: consume(a, b, p[0].permute(1, 2, 3, 0))
    kernel = gaussian_kernel_3d(sigma)
    h = kernel.shape[0] // 2
    state: dict = {"buf": None, "buf_lo": 0, "done": 0, "w": None}

    def emit(a: int, b: int, p: torch.Tensor) -> None:
        buf = p if state["buf"] is None else torch.cat([state["buf"], p], 2)
        state["buf"] = None
        del p
        done, buf_lo = state["done"], state["buf_lo"]
        end = n if b == n else b - h
        if end <= done:
            state["buf"] = buf
            return
        if state["w"] is None:
            c = buf.shape[1]
            state["w"] = kernel.to(buf.device)[None, None].expand(c, 1, *kernel.shape).contiguous(
                memory_format=torch.channels_last_3d)
        wlo, whi = done - h, end + h
        window = buf[:, :, max(wlo, 0) - buf_lo: min(whi, n) - buf_lo]
        if wlo < 0 or whi > n:
            window = F.pad(window, (0, 0, 0, 0, max(0, -wlo), max(0, whi - n)))
        window = window.to(torch.float32).contiguous(memory_format=torch.channels_last_3d)
        keep = max(end - h, 0)
        if end < n:  # the unsmoothed rows the next smoothed ones need
            state["buf"], state["buf_lo"] = buf[:, :, keep - buf_lo:].clone(), keep
        del buf
        state["done"] = end
        for r in range(done, end):  # one row at a time: one row of smoothed posteriors is held
            y = F.conv3d(window[:, :, r - done: r - done + 2 * h + 1], state["w"], groups=window.shape[1],
                         padding=(0, h, h))
            consume(r, r + 1, y[0].permute(1, 2, 3, 0))
            del y

    return emit


def parcellate_rows(posteriors: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``predict_synthseg.py::postprocess`` on voxels of the parcellation's (..., C) float32
    posteriors, in place: channel 0 is set to ``background`` (1 outside the final cortex, 0 in
    it), the channels renormalised; returns the argmax channel (...) uint8."""
    posteriors[..., 0] = background
    posteriors /= np.sum(posteriors, axis=-1)[..., np.newaxis]
    return posteriors.argmax(-1).astype(np.uint8)


def parcellation_input(image: torch.Tensor, cortex: torch.Tensor) -> torch.Tensor:
    """[image, not cortex, cortex] (1, 3, X, Y, Z) float32, channels-last, of (rows of) the padded
    image and its 0/1 cortex map (the network chain's)."""
    x = torch.empty((*image.shape, 3), dtype=torch.float32, device=image.device)
    x[..., 0] = image
    x[..., 2] = cortex
    torch.sub(1, x[..., 2], out=x[..., 1])
    return x.permute(3, 0, 1, 2)[None]


class ParcellationNetwork(SlabNetwork):
    """The parcellation U-Net, streamed, whose input (:func:`parcellation_input`) is built slab by
    slab from the padded image and its cortex map (a :class:`~.inference.BuiltInput`): it is never
    stored whole either."""

    def parcellation_pass(self, image: torch.Tensor, cortex: torch.Tensor,
                          emit: Callable[[int, int, torch.Tensor], None],
                          progress: Callable[[float], None] | None = None) -> None:
        """:meth:`SlabNetwork._pass` on [image, not cortex, cortex] of the padded ``image`` and its
        0/1 ``cortex`` map (X, Y, Z)."""
        x = BuiltInput(3, image.shape, lambda a, b: parcellation_input(image[a:b], cortex[a:b]), image.device)
        with torch.no_grad():
            self._pass(x, False, emit, progress)


def streamed_parcellation(net: ParcellationNetwork, image: torch.Tensor, cortex_map: torch.Tensor,
                          sigma: float | None, unpad: tuple[slice, slice, slice], cortex: np.ndarray,
                          progress: Callable[[float], None] | None = None, threads: int = 1
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The parcellation of the final cortex, slab by slab: the parcellation U-Net on the padded
    ``image`` and the network chain's 0/1 ``cortex_map`` (:meth:`ParcellationNetwork.parcellation_pass`),
    smoothed unless ``sigma`` is None, then in the ``unpad`` region :func:`parcellate_rows` with
    background = not ``cortex`` (the final cortex mask, unpadded shape). Returns the argmax
    channel map (unpadded shape, uint8) and the float32 soft sums of the parcels (channels 1..),
    summed in RAS order over the unpadded region, as the original. Its posteriors are never
    stored whole."""
    xs, ys, zs = unpad
    index = np.zeros(cortex.shape, dtype=np.uint8)
    n_out = net.model.config.out_channels
    state = {"sums": np.zeros(n_out - 1, dtype=np.float32)}

    def consume(a: int, b: int, rows: torch.Tensor) -> None:
        for r in range(max(a, xs.start), min(b, xs.stop)):  # row by row: small temporaries
            p = rows[r - a, ys, zs]
            p = p.numpy() if p.device.type == "cpu" else p.cpu().numpy()  # a view of a temporary: changed in place
            r0 = r - xs.start

            def block(i: int, j: int, p=p, r0=r0) -> None:
                index[r0, i:j] = parcellate_rows(p[i:j], ~cortex[r0, i:j])

            for_row_blocks(p.shape[0], block, threads, rows=-(-p.shape[0] // max(1, threads)))
            state["sums"] = add_running_sums(p, state["sums"])

    net.parcellation_pass(image, cortex_map, smoothed_rows(image.shape[0], sigma, consume), progress)
    return index, state["sums"]


def one_hot(index: torch.Tensor, depth: int) -> torch.Tensor:
    """One-hot float32 (1, depth, X, Y, Z) of an index map, laid out channels-last, built without
    an int64 one-hot."""
    x = torch.zeros((*index.shape, depth), dtype=torch.float32, device=index.device)
    x.view(-1, depth).scatter_(1, index.reshape(-1, 1).to(torch.int64), 1.0)
    return x.permute(3, 0, 1, 2)[None]


def qc_scores_of(qc_net: SlabEncoder | torch.nn.Module, index: torch.Tensor, labels: Sequence[int],
                 target: int | None = None) -> np.ndarray:
    """Raw QC scores (9,) of a padded argmax index map (``MakeShape`` to ``target``, by default
    :data:`QC_INPUT_SHAPE`; label -> QC group, one-hot, QC network streamed in slabs), with a
    compact input: a uint8 group map whose one-hot is built a slab of rows at a time."""
    if not isinstance(qc_net, SlabEncoder):
        qc_net = SlabEncoder(qc_net)
    crop = qc_crop_to_shape(index, target or QC_INPUT_SHAPE, QC_IGNORED_INDEX)
    lut = torch.tensor([QC_GROUPS.get(int(lab), 0) for lab in labels], dtype=torch.uint8, device=index.device)
    groups = lut[crop.to(torch.int64)]
    del crop
    return qc_net.scores(one_hot_input(groups, len(QC_NAMES)))[0].float().cpu().numpy()


def write_qc_csv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """The QC CSV (``subject`` and the 8 QC groups; CRLF line ends as Python's csv writer), atomically."""
    return write_csv(path, ["subject", *QC_NAMES[1:]], rows)


# -- memory -----------------------------------------------------------------------------------
#: the robust chain, beyond the plain segmentation and its slab temporaries, per padded voxel. Its
#: denoiser, streamed (:class:`~.inference.SlabNetwork`), peaked 0.72 GiB above its input at 256^3 (2
#: threads, 256 MB slab budget; unstreamed: 460 B/voxel, 7.7 GiB); the whole ``--robust`` run peaked
#: 4.65 to 4.77 GiB there (three runs), 1.2 to 1.3 GiB above :func:`segmentation_bytes`, during
#: segmenter2's top level: this figure is set from those runs
DENOISER_BYTES_PER_VOXEL = 56
#: the QC network, streamed (:class:`~.inference.SlabEncoder`), beyond its slab temporaries: its uint8
#: group map, rows waiting in the streams, the last level whole. At 224^3 (256 MB slab budget) its stage
#: peaked 0.55 GiB; unstreamed, 4e9 bytes (3.7 GiB)
QC_BYTES = 64 * 2**20


def extra_bytes(padded_shape: Sequence[int], options: Options, slab_budget: int) -> int:
    """Memory the 2.0 options need on top of the plain segmentation's (:func:`segmentation_bytes`),
    for a padded network input of ``padded_shape``: the robust chain's denoiser and the QC network's
    fixed 224^3 pass, during the network stage; the parcellation after postprocessing. All are
    streamed.

    Measured peak RSS (``/usr/bin/time -v``) at 256^3 (hebbianloop T1, 2 threads, random-weight 2.0
    networks), before and after the denoiser and QC were streamed: ``--robust --parc --qc`` 7.52 ->
    4.71 GiB (estimate 11.2 -> 4.9 GiB), ``--robust`` 8.00 -> 4.77 GiB, ``--qc`` 5.99 -> 3.67 GiB;
    outputs identical."""
    v = math.prod(padded_shape)
    robust = qc = parc = 0
    if options.robust:
        # the chain's buffers and slabs (measured: DENOISER_BYTES_PER_VOXEL); the denoised argmax
        # (uint8) waits through segmenter2, whose [image, one-hot] input is built slab by slab
        robust = DENOISER_BYTES_PER_VOXEL * v + SLAB_FACTOR * slab_budget + v
    if options.qc:
        qc = QC_BYTES + SLAB_FACTOR * slab_budget
    if options.parc:
        # with the segmentation's posteriors and postprocessed label map (the segmentation's network
        # pass, whose skip connections and slabs the parcellation network's match, is counted): the
        # image and label maps kept, the parcellation's top-level stream (recomputed skip) and its
        # consumer; 0.69 GiB at 256^3, measured 0.67 GiB over the plain run of the same geometry
        parc = 12 * v + SLAB_FACTOR * slab_budget
    # the cortex map (uint8) waits for the parcellation through the network stage
    return max(options.parc * v + max(robust, qc), parc)


# -- the segmenter ----------------------------------------------------------------------------
class SynthSeg2Segmenter(Segmenter):
    """A :class:`Segmenter` with SynthSeg 2.0's options (:class:`Options`).

    ``model``: the segmentation model file, or with ``robust`` the SynthSeg-robust file; the
    parcellation and QC networks are found beside it, or installed (``parc_model``,
    ``qc_model`` name them otherwise).
    """

    def __init__(self, model: str | os.PathLike, options: Options, device: str = "auto",
                 threads: int | None = None, slab_budget_mb: int | None = None, precision: str = "float32",
                 parc_model: str | os.PathLike | None = None, qc_model: str | os.PathLike | None = None,
                 tune_allocator: bool = True):
        self.options = options
        model = Path(model)
        if options.robust:
            robust, info = load_model(model, "cpu", role="robust")
            super().__init__(robust.segmenter2, device, threads, slab_budget_mb, labels=info.labels,
                             preprocessing=info.preprocessing, name=info.name, precision=precision,
                             tune_allocator=tune_allocator)
            self.info = info
            first = robust.segmenter.to(self.device).eval()
            self.robust_first = SlabNetwork(first, slab_budget_mb=self.network.budget // 2**20, dtype=self.dtype)
            self.denoiser = SlabNetwork(robust.denoiser.to(self.device), slab_budget_mb=self.network.budget // 2**20,
                                        dtype=self.dtype)
            self.robust_first.share_memory_hooks(self.network)
            self.denoiser.share_memory_hooks(self.network)
        else:
            super().__init__(model, device, threads, slab_budget_mb, precision=precision,
                             tune_allocator=tune_allocator)
        if (options.parc or options.qc) and list(self.labels) not in SYNTHSEG_LABEL_LISTS:
            raise ModelFileError(f"{model}: --parc and --qc need a SynthSeg 2.0 or 1.0 segmentation model "
                                 f"(its 33 or 32 labels); this one has {len(self.labels)}")
        if options.ct:
            self.intensity_clip = CT_RANGE
        self.parc_net = self.qc_net = None
        self.parc_path = self.qc_path = None
        if options.parc:
            self.parc_path = Path(parc_model) if parc_model else companion_model(PARC_MODEL, model, "--parc")
            net, _ = load_model(self.parc_path, "cpu", role="parcellation")
            self.parc_net = ParcellationNetwork(net.to(self.device), slab_budget_mb=self.network.budget // 2**20,
                                                dtype=self.dtype)
            self.parc_net.share_memory_hooks(self.network)
        if options.qc:
            self.qc_path = Path(qc_model) if qc_model else companion_model(QC_MODEL, model, "--qc")
            net, _ = load_model(self.qc_path, "cpu", role="qc")
            net = net.to(self.device).eval()
            if self.device.type == "cpu":
                net.to(memory_format=torch.channels_last_3d)
            self.qc_net = SlabEncoder(net, slab_budget_mb=self.network.budget // 2**20)
        self._extra: dict = {}

    @property
    def volume_labels(self) -> list[int]:
        """The labels of the volumes CSV: the segmentation's, then the parcels (``--parc``)."""
        return [*self.labels, *(PARCELLATION_LABELS[1:] if self.options.parc else ())]

    # -- the pipeline's steps -------------------------------------------------------------------
    def _segment(self, input_path, outputs, fast, crop, output_grid, progress, channel, auto_crop) -> Result:
        self._extra = {}
        if progress is not None and self.options.parc:
            progress = self._with_parcellation_progress(progress)
        try:
            # SynthSeg's geometry: the QC input's placement depends on the padded shape
            result = super()._segment(input_path, outputs, fast or self.options.robust, crop, output_grid,
                                      progress, channel, False)
            result.labels = self.volume_labels
            if "parc_seconds" in self._extra:  # timed apart from the postprocessing it runs within
                result.timings["parcellation"] = self._extra["parc_seconds"]
                result.timings["postprocess"] -= self._extra["parc_seconds"]
            if self.options.qc:
                values = qc_csv_values(self._extra["qc"])
                result.qc = {name: float(v) for name, v in zip(QC_NAMES[1:], values)}
                self._extra["qc_row"] = values
            return result
        finally:
            self._extra.pop("parc_input", None)
            self._extra.pop("parc_progress", None)

    def _with_parcellation_progress(self, progress: Callable[[str, float], None]) -> Callable[[str, float], None]:
        """``progress`` with the network stage's share of the run split: the segmentation (and QC)
        networks, then postprocessing's parcellation network (stage ``parcellation``, reported by
        :meth:`_label_map`), in proportion to their work; fractions stay increasing."""
        start, end = STAGES["network"]
        seg_work = 1 + (0.5 if self.options.qc else 0)
        middle = start + (end - start) * seg_work / (seg_work + 1)

        def report(stage: str, f: float) -> None:
            if stage in ("network", "postprocessing") and start <= f <= end:
                f = start + (f - start) * (middle - start) / (end - start)
            progress(stage, f)

        self._extra["parc_progress"] = lambda f: progress("parcellation", middle + (end - middle) * f)
        return report

    def network_input_shape(self, input_path: str | os.PathLike, crop: list[int] | None = None,
                            auto_crop: bool = True, channel: int | None = None) -> tuple[int, int, int]:
        """As :meth:`Segmenter.network_input_shape`, with SynthSeg's geometry (no auto-crop)."""
        return super().network_input_shape(input_path, crop, False, channel)

    def qc_row(self) -> list[str]:
        """The QC CSV's values for the image segmented last (``'%.4f'``, groups 1..8)."""
        return list(self._extra.get("qc_row", []))

    def _network_posteriors(self, volume: torch.Tensor, fast: bool, progress: Callable[[float], None]
                            ) -> torch.Tensor:
        o = self.options
        n_steps = 1 + (0.5 if o.qc else 0)
        step = {"k": 0}

        def part(f: float) -> None:
            progress(min(1.0, (step["k"] + f) / n_steps))

        sigma = self.pre.posterior_smoothing_sigma
        if o.robust:
            post = self._robust_posteriors(volume, part)
            final = out_index = post.argmax(0).to(torch.uint8)
        elif fast and (o.parc or o.qc):
            # the segmentation uses the UNSMOOTHED softmax; the chain's output is its smoothing
            post = self.network.posteriors(volume, sigma=None, flip_indices=None, progress=part)
            final = smoothed_argmax(post.permute(1, 2, 3, 0), sigma) if sigma else post.argmax(0).to(torch.uint8)
            out_index = post.argmax(0).to(torch.uint8) if o.parc and o.qc else None
        else:
            post = super()._network_posteriors(volume, fast, part)
            final = out_index = post.argmax(0).to(torch.uint8)
        if o.parc:  # the parcellation network runs after postprocessing (:meth:`_label_map`)
            is_cortex = torch.tensor([lab in CORTEX_LABELS for lab in self.labels], device=final.device)
            self._extra["parc_input"] = (volume, is_cortex[final.to(torch.int64)].to(torch.uint8))
        if o.qc:
            step["k"] = 1
            index = out_index if o.parc else final
            self._extra["qc"] = qc_scores_of(self.qc_net, index, self.labels)
        progress(1.0)
        return post

    def _robust_posteriors(self, volume: torch.Tensor, progress: Callable[[float], None]) -> torch.Tensor:
        """``unet2_prediction`` (C, X, Y, Z) of the robust chain (no flip, no smoothing)."""
        g = streamed_argmax(self.robust_first, volume[None, None], lambda f: progress(0.3 * f))
        d = streamed_argmax(self.denoiser, one_hot_input(g, DENOISER_GROUPS), lambda f: progress(0.3 + 0.2 * f))
        del g
        post = streamed_softmax(self.network, one_hot_input(d, DENOISER_GROUPS, volume),
                                lambda f: progress(0.5 + 0.5 * f))
        return post.permute(3, 0, 1, 2)

    def _label_map(self, post: np.ndarray, index: np.ndarray, prep: _Prepared) -> np.ndarray:
        seg = super()._label_map(post, index, prep)
        parc_input = self._extra.pop("parc_input", None)
        if parc_input is None:
            return seg
        unpad = tuple(slice(lo, lo + n) for (lo, _), n in zip(prep.padding, prep.cropped_shape))
        mask = np.isin(seg, CORTEX_LABELS)
        self.parc_net.between_stages()  # postprocessing's freed temporaries go back first
        sigma = self.pre.posterior_smoothing_sigma
        start = time.perf_counter()
        # with --qc the original outputs the unsmoothed softmax
        parc_index, self._extra["parc_sums"] = streamed_parcellation(
            self.parc_net, *parc_input, sigma if sigma and not self.options.qc else None, unpad, mask,
            self._extra.get("parc_progress"), torch.get_num_threads())
        del parc_input
        self.parc_net.between_stages()
        self._extra["parc_seconds"] = time.perf_counter() - start
        seg[mask] = np.asarray(PARCELLATION_LABELS, dtype=np.int32)[parc_index[mask]]
        return seg

    def _volume_values(self, post: np.ndarray, prep: _Prepared, crop: list[int] | None) -> list[str]:
        if not self.options.parc:
            return super()._volume_values(post, prep, crop)
        sums = soft_volumes(prep.orientation.from_ras(post), dtype=np.float64 if crop else np.float32)
        volumes = sums
        if has_total(self.labels):  # 2.0 (not --v1): the total first
            volumes = np.concatenate([np.array([np.sum(sums)], dtype=sums.dtype), sums])
        # as ``predict_synthseg.py::postprocess``: the channel indices of labels 3 and 42, less one, in
        # the volumes: with 2.0, whose first value is the total, those of labels 2 and 41 (cerebral
        # white matter); with 1.0 (no total), those of the cortex itself
        cortex = np.sum(volumes[np.flatnonzero(np.isin(self.labels, CORTEX_LABELS)) - 1])
        parc = self._extra.pop("parc_sums")
        parc = parc / np.sum(parc) * parc.dtype.type(cortex)
        return volume_row(np.concatenate([volumes, parc.astype(volumes.dtype)]), prep.voxel_volume,
                          with_total=False)

    def _check_memory(self, declared, shapes, outputs, output_grid) -> None:
        super()._check_memory(declared, shapes, outputs, output_grid)
        extra = extra_bytes(shapes.padded_shape, self.options, self.network.budget)
        if not extra:
            return
        cfg = self.model.config
        base = segmentation_bytes(shapes, cfg.out_channels, cfg.level_features(), self.network.budget,
                                  posteriors=outputs.posteriors is not None, input_grid=output_grid == "input",
                                  on_gpu=self.device.type == "cuda",
                                  posterior_bytes=self.network.posterior_dtype.itemsize,
                                  activation_bytes=self.network.dtype.itemsize)
        flags = " ".join(f"--{k}" for k in ("robust", "parc", "qc") if getattr(self.options, k))
        grid = "x".join(map(str, shapes.padded_shape))
        check_fits(base + extra, f"{declared.path}: segmenting this image with {flags} (network input {grid})",
                   "try --crop (a smaller block), or leave out --parc/--robust")
