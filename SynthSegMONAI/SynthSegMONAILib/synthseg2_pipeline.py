"""SynthSeg 2.0's options of ``SynthSeg_predict``: ``--robust``, ``--parc``, ``--qc``, ``--ct``.

:class:`SynthSeg2Segmenter` is the engine's :class:`~.pipeline.Segmenter` (same loading,
preprocessing, postprocessing and writing) with the original's network chain
(``predict_synthseg.py::build_model``, commit 66342c1) in place of the plain network pass,
and its parcellation step after the segmentation's postprocessing (``postprocess``):

- ``--robust``: segmenter -> denoiser -> segmenter2 (:class:`~.synthseg2_networks.RobustSegmenter`),
  no flip pass, no smoothing, ``--fast`` postprocessing.
- ``--parc``: the parcellation U-Net on [image, not cortex, cortex] (cortex: argmax of the chain's
  final tensor is 3 or 42), smoothed unless ``--qc`` is also given; after postprocessing its
  argmax labels the voxels of the final cortex mask, and its 68 volumes follow the
  segmentation's in the CSV.
- ``--qc FILE``: the QC network on the argmax cropped/padded to 224^3 (``MakeShape``), one CSV
  row per image.
- ``--ct``: intensities clipped to [0, 80] before normalising.

Which posteriors feed what follows the original exactly (``Testing/Data/synthseg2/README.md``,
behaviours 7, 8, 9 and 12): with ``--fast`` and ``--parc`` or ``--qc`` the segmentation uses the
UNSMOOTHED softmax, the parcellation's cortex mask the smoothed one's argmax, and the QC the
smoothed argmax without ``--parc`` but the unsmoothed one with it.

Geometry: these modes run SynthSeg's own (the network on the whole padded volume, as
``--no-auto-crop``): the QC input's placement depends on the padded shape.

Memory: the U-Nets with a skip connection at every level (segmentation, parcellation, the
robust model's first and last) are streamed in slabs (:class:`~.inference.SlabNetwork`, any
number of input channels); the robust model's denoiser (no top skip connections) and the QC
network run on the whole volume: :func:`extra_bytes` estimates what they add.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .errors import ModelFileError
from .inference import SlabNetwork, gaussian_kernel_3d
from .labels import PARCELLATION_LABELS
from .memory_estimate import check_fits, segmentation_bytes
from .model_file import load_model
from .model_registry import MODEL_SUFFIX, available_models, user_model_dir
from .pipeline import Result, Segmenter, _Prepared
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
from .volumes import soft_volumes, volume_row, write_csv

#: installed model names SynthSeg's script loads from ``<SynthSeg>/models``
ROBUST_MODEL, PARC_MODEL, QC_MODEL = "synthseg_robust_2.0", "synthseg_parc_2.0", "synthseg_qc_2.0"
#: the original's closing citation with ``--robust``
ROBUST_CITATION = (
    "If you use the new robust version of SynthSeg in a publication, please cite:\n"
    "Robust machine learning segmentation for large-scale analysis of heterogeneous clinical brain MRI datasets\n"
    "B. Billot, M. Collin, S.E. Arnold, S. Das, J.E. Iglesias"
)
CT_RANGE = (0.0, 80.0)  #: ``--ct`` clips intensities to this range (``predict_synthseg.py::preprocess``)


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
def streamed_softmax(net: SlabNetwork, x: torch.Tensor, progress: Callable[[float], None] | None = None
                     ) -> torch.Tensor:
    """Softmax (X, Y, Z, C) float32 of a U-Net for an input (1, C_in, X, Y, Z), streamed in slabs
    (exact: a whole-volume pass's values); the top skip connection is kept in the output buffer
    when it fits there."""
    n_out = net.model.config.out_channels
    out = torch.empty((*x.shape[2:], n_out), dtype=torch.float32, device=x.device)
    skip0 = None
    if n_out >= net.feats[0] and net.dtype == torch.float32:
        skip0 = out.permute(3, 0, 1, 2)[None, : net.feats[0]]

    def emit(a: int, b: int, p: torch.Tensor) -> None:
        out[a:b].copy_(p[0].permute(1, 2, 3, 0))

    with torch.no_grad():
        net._pass(x, False, emit, progress, skip0=skip0)
    return out


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


def one_hot(index: torch.Tensor, depth: int) -> torch.Tensor:
    """One-hot float32 (1, depth, X, Y, Z) of an index map, laid out channels-last, built without
    an int64 one-hot."""
    x = torch.zeros((*index.shape, depth), dtype=torch.float32, device=index.device)
    x.view(-1, depth).scatter_(1, index.reshape(-1, 1).to(torch.int64), 1.0)
    return x.permute(3, 0, 1, 2)[None]


def qc_scores_of(qc_net: torch.nn.Module, index: torch.Tensor, labels: Sequence[int],
                 target: int | None = None) -> np.ndarray:
    """Raw QC scores (9,) of a padded argmax index map (``MakeShape`` to ``target``, by default
    :data:`QC_INPUT_SHAPE`; label -> QC group, one-hot, QC network), with a compact input (a uint8
    group map, a channels-last float32 one-hot)."""
    crop = qc_crop_to_shape(index, target or QC_INPUT_SHAPE, QC_IGNORED_INDEX)
    lut = torch.tensor([QC_GROUPS.get(int(lab), 0) for lab in labels], dtype=torch.uint8, device=index.device)
    x = one_hot(lut[crop.to(torch.int64)], len(QC_NAMES))
    del crop
    with torch.no_grad():
        return qc_net(x)[0].float().cpu().numpy()


def write_qc_csv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    """The QC CSV (``subject`` and the 8 QC groups; CRLF line ends as Python's csv writer), atomically."""
    return write_csv(path, ["subject", *QC_NAMES[1:]], rows)


# -- memory -----------------------------------------------------------------------------------
DENOISER_BYTES_PER_VOXEL = 460  #: peak of the robust model's unstreamed denoiser, per padded voxel
QC_BYTES = 4_000_000_000  #: the QC network at 224^3, measured peak (one-hot input, 3 activations of level 0)


def extra_bytes(padded_shape: Sequence[int], options: Options, slab_budget: int) -> int:
    """Memory the 2.0 options need on top of the plain segmentation's (:func:`segmentation_bytes`),
    for a padded network input of ``padded_shape``: the parcellation posteriors (69 float32
    channels, kept until the volumes) with the network's input and streamed temporaries, the
    robust chain's unstreamed denoiser, the QC network's fixed 224^3 pass."""
    v = math.prod(padded_shape)
    robust = parc = qc = 0
    if options.robust:
        # the denoiser on the whole volume (5x5x5 convolutions, the level-1 output upsampled to 32
        # channels at full resolution): 450 bytes per voxel measured at 96^3 (CPU, channels-last);
        # then segmenter2's 6-channel input and the index maps
        robust = DENOISER_BYTES_PER_VOXEL * v + 4 * 6 * v + 9 * v
    if options.parc:
        skips = sum(4 * f * v // 8**i for i, f in enumerate((48, 96, 192), start=1))
        parc = 4 * len(PARCELLATION_LABELS) * v + 12 * v + 2 * v + skips + 2 * slab_budget
    if options.qc:
        qc = QC_BYTES
    # in order: the robust chain (freed), the parcellation (kept until the volumes), the QC pass
    return max(robust, parc + qc)


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
            self.denoiser = robust.denoiser.to(self.device).eval()
            if self.device.type == "cpu":
                self.denoiser.to(memory_format=torch.channels_last_3d)
        else:
            super().__init__(model, device, threads, slab_budget_mb, precision=precision,
                             tune_allocator=tune_allocator)
        if (options.parc or options.qc) and list(self.labels) != list(SEGMENTATION_LABELS_2):
            raise ModelFileError(f"{model}: --parc and --qc need a SynthSeg 2.0 segmentation model (its 33 "
                                 f"labels); this one has {len(self.labels)}")
        if options.ct:
            self.intensity_clip = CT_RANGE
        self.parc_net = self.qc_net = None
        self.parc_path = self.qc_path = None
        if options.parc:
            self.parc_path = Path(parc_model) if parc_model else companion_model(PARC_MODEL, model, "--parc")
            net, _ = load_model(self.parc_path, "cpu", role="parcellation")
            self.parc_net = SlabNetwork(net.to(self.device), slab_budget_mb=self.network.budget // 2**20,
                                        dtype=self.dtype)
        if options.qc:
            self.qc_path = Path(qc_model) if qc_model else companion_model(QC_MODEL, model, "--qc")
            net, _ = load_model(self.qc_path, "cpu", role="qc")
            self.qc_net = net.to(self.device).eval()
            if self.device.type == "cpu":
                self.qc_net.to(memory_format=torch.channels_last_3d)
        self._extra: dict = {}

    @property
    def volume_labels(self) -> list[int]:
        """The labels of the volumes CSV: the segmentation's, then the parcels (``--parc``)."""
        return [*self.labels, *(PARCELLATION_LABELS[1:] if self.options.parc else ())]

    # -- the pipeline's steps -------------------------------------------------------------------
    def _segment(self, input_path, outputs, fast, crop, output_grid, progress, channel, auto_crop) -> Result:
        self._extra = {}
        try:
            # SynthSeg's geometry: the QC input's placement depends on the padded shape
            result = super()._segment(input_path, outputs, fast or self.options.robust, crop, output_grid,
                                      progress, channel, False)
            result.labels = self.volume_labels
            if self.options.qc:
                values = qc_csv_values(self._extra["qc"])
                result.qc = {name: float(v) for name, v in zip(QC_NAMES[1:], values)}
                self._extra["qc_row"] = values
            return result
        finally:
            self._extra.pop("parc", None)

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
        n_steps = 1 + o.parc + (0.5 if o.qc else 0)
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
        if o.parc:
            step["k"] = 1
            x = self._parcellation_input(volume, final)
            parc = streamed_softmax(self.parc_net, x, part)
            del x
            if sigma and not o.qc:  # with --qc the original outputs the unsmoothed softmax
                self.parc_net._smooth(parc, sigma)
            self._extra["parc"] = parc
        if o.qc:
            step["k"] = 1 + o.parc
            index = out_index if o.parc else final
            self._extra["qc"] = qc_scores_of(self.qc_net, index, self.labels)
        progress(1.0)
        return post

    def _parcellation_input(self, volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[image, not cortex, cortex] (1, 3, X, Y, Z) float32, channels-last."""
        is_cortex = torch.tensor([lab in CORTEX_LABELS for lab in self.labels], device=index.device)
        x = torch.empty((*volume.shape, 3), dtype=torch.float32, device=volume.device)
        x[..., 0] = volume
        x[..., 2] = is_cortex[index.to(torch.int64)]
        torch.sub(1, x[..., 2], out=x[..., 1])
        return x.permute(3, 0, 1, 2)[None]

    def _robust_posteriors(self, volume: torch.Tensor, progress: Callable[[float], None]) -> torch.Tensor:
        """``unet2_prediction`` (C, X, Y, Z) of the robust chain (no flip, no smoothing)."""
        groups = streamed_softmax(self.robust_first, volume[None, None], lambda f: progress(0.3 * f))
        g = groups.argmax(-1)
        del groups
        with torch.no_grad():
            denoised = self.denoiser(one_hot(g, DENOISER_GROUPS))
        del g
        d = denoised[0].argmax(0)  # the softmax keeps the argmax
        del denoised
        progress(0.5)
        x = torch.cat([volume[..., None], one_hot(d, DENOISER_GROUPS)[0].permute(1, 2, 3, 0)], -1)
        del d
        post = streamed_softmax(self.network, x.permute(3, 0, 1, 2)[None], lambda f: progress(0.5 + 0.5 * f))
        return post.permute(3, 0, 1, 2)

    def _label_map(self, post: np.ndarray, index: np.ndarray, prep: _Prepared) -> np.ndarray:
        seg = super()._label_map(post, index, prep)
        parc_t = self._extra.pop("parc", None)
        if parc_t is None:
            return seg
        unpad = tuple(slice(lo, lo + n) for (lo, _), n in zip(prep.padding, prep.cropped_shape))
        parc = parc_t.cpu().numpy()[unpad]  # a view: renormalised in place
        mask = np.isin(seg, CORTEX_LABELS)
        parc_index = np.empty(seg.shape, dtype=np.int32)

        def block(a: int, b: int) -> None:
            p = parc[a:b]
            p[..., 0] = ~mask[a:b]  # background: 1 outside the final cortex, 0 inside
            p /= np.sum(p, axis=-1)[..., np.newaxis]
            parc_index[a:b] = p.argmax(-1)

        for_row_blocks(parc.shape[0], block, torch.get_num_threads())
        seg[mask] = np.asarray(PARCELLATION_LABELS, dtype=np.int32)[parc_index[mask]]
        # the original sums the parcellation's posteriors unpasted, in RAS order
        self._extra["parc_sums"] = soft_volumes(parc, dtype=np.float32)
        return seg

    def _volume_values(self, post: np.ndarray, prep: _Prepared, crop: list[int] | None) -> list[str]:
        if not self.options.parc:
            return super()._volume_values(post, prep, crop)
        sums = soft_volumes(prep.orientation.from_ras(post), dtype=np.float64 if crop else np.float32)
        volumes = np.concatenate([np.array([np.sum(sums)], dtype=sums.dtype), sums])
        # as ``predict_synthseg.py::postprocess``: the channel indices of labels 3 and 42, less one, in
        # the volumes whose first value is the total: those of labels 2 and 41 (cerebral white matter)
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
