"""SynthSeg's prediction pipeline, one image at a time, with the model loaded once.

load -> resample to 1 mm (write ``--resample``) -> reorient to RAS -> ``--crop`` ->
normalise -> pad (auto-crop: only the head's box) -> network (+ flip pass, + smoothing) ->
postprocess -> renormalise, argmax -> paste back -> orient back to the input axes -> volumes
-> outputs.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .allocator import FreedMemoryBound, discard_pages, keep_freed_memory, release_freed_memory
from .errors import ModelFileError, OptionError, ResourceLimitError
from .head_box import crop_of_field, network_field
from .image_header import ImageHeader, read_image_header
from .inference import SlabNetwork
from .labels import check_label_list, flip_indices, topological_classes
from .memory_estimate import (
    MAX_GRID_SIDE,
    RunShapes,
    check_fits,
    check_grid,
    gpu_network_bytes,
    segmentation_bytes,
)
from .model_file import DEFAULT_PREPROCESSING, ModelInfo, check_preprocessing, load_weights
from .network import SynthSegUNet
from .output_files import OutputTransaction, check_output_name
from .postprocess import postprocess_default, postprocess_fast
from .precision import network_dtype
from .preprocess import (
    Orientation,
    Preprocessing,
    ResampleGrid,
    centre_crop_box,
    linear_along_axis,
    needs_resampling,
    normalise,
    orientation_to_ras,
    padding_box,
    reorient_to_ras,
    resample_grid,
    resample_to_1mm,
    resampled_affine,
    round_up,
)
from .volume_io import Image, load_image, save_image
from .volumes import soft_volumes, subject_name, volume_row

ProgressFn = Callable[[str, float], None]  # (stage, fraction of this image 0..1)

STAGES = {  # stage -> (start, end) fraction of one image's work
    "loading": (0.0, 0.03),
    "preprocessing": (0.03, 0.08),
    "network": (0.08, 0.88),
    "postprocessing": (0.88, 0.96),
    "writing": (0.96, 1.0),
}


def choose_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def default_slab_budget_mb(device: torch.device) -> int:
    """256 MB of slab temporaries on the CPU (the whole run then stays under 4 GB at 256^3);
    on a GPU, thick slabs (an eighth of its memory, at most 8 GB) keep the kernels large."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(8192, total / 8 / 2**20))
    return 256


@dataclass
class Outputs:
    """Where one image's results go (None: not written)."""

    segmentation: Path
    posteriors: Path | None = None
    resampled: Path | None = None


@dataclass
class Result:
    """What segmenting one image produced."""

    input: Path
    outputs: Outputs
    volume_row: list[str]
    labels: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    written: dict[str, Path] = field(default_factory=dict)  #: output kind -> file actually written
    empty: bool = False  #: no voxel got a structure (every posterior under the thresholds)
    notes: list[str] = field(default_factory=list)  #: warnings for the user
    qc: dict[str, float] | None = None  #: SynthSeg 2.0's QC score per QC group (``--qc``; :mod:`.synthseg2_pipeline`)
    present: list[int] = field(default_factory=list)  #: labels in the segmentation written (ascending, no 0)


class Segmenter:
    """Holds a model and segments images with SynthSeg's pipeline.

    ``model`` is a model file, or an in-memory :class:`SynthSegUNet` with its ``labels`` (one
    per output channel) and ``preprocessing`` settings (a model file's metadata; SynthSeg's
    defaults when omitted): training validation then runs the user's exact pipeline. The
    segmenter works on its own float32 copy of an in-memory network, in eval mode: the
    caller's network is left as it was, and later changes to it are not seen.

    ``precision`` is the network's arithmetic (:mod:`.precision`: float32, bfloat16 or auto);
    ``tune_allocator`` keeps the network's freed slabs for reuse (:mod:`.allocator`; process-wide).
    """

    def __init__(self, model: str | os.PathLike | SynthSegUNet, device: str = "auto", threads: int | None = None,
                 slab_budget_mb: int | None = None, *, labels: Sequence[int] | None = None,
                 preprocessing: Mapping | Preprocessing | None = None, name: str = "in-memory model",
                 precision: str = "float32", tune_allocator: bool = True):
        if threads:
            torch.set_num_threads(int(threads))
        self.device = choose_device(device)
        self.dtype = network_dtype(precision, self.device)
        t0 = time.perf_counter()
        if isinstance(model, SynthSegUNet):
            self.model, self.info = _in_memory_model(model, self.device, labels, preprocessing, name)
        elif isinstance(model, torch.nn.Module):
            raise TypeError(f"an in-memory model must be a SynthSegUNet, not {type(model).__name__}")
        else:
            if labels is not None or preprocessing is not None:
                raise ValueError("labels and preprocessing come from the model file; give them only "
                                 "with an in-memory network")
            self.model, self.info = load_weights(model, self.device)
        self.load_time = time.perf_counter() - t0
        self.labels = list(self.info.labels)
        self.pre = Preprocessing.from_dict(self.info.preprocessing)
        self.network = SlabNetwork(self.model, slab_budget_mb=slab_budget_mb or default_slab_budget_mb(self.device),
                                   dtype=self.dtype)
        self.tune_allocator = tune_allocator and keep_freed_memory()
        if self.tune_allocator:  # freed slabs are reused within a stage, handed back between stages
            bound = FreedMemoryBound(allowance=self.network.budget // 2)
            self.network.between_stages = bound.release
            # and handed back within one when fragmentation nears the peak (the network's own
            # memory only: on a GPU its buffers are not the process's)
            if bound.active and self.device.type == "cpu":
                self.network.between_slabs = bound.check
                self.network.touch_buffers = True
                self.network.discard_pages = discard_pages
                self.network.untouched = bound.untouched

    # ---------------------------------------------------------------------------------------
    def segment(self, input_path: str | os.PathLike, outputs: Outputs, fast: bool = False,
                crop: list[int] | None = None, output_grid: str = "synthseg",
                progress: ProgressFn | None = None, channel: int | None = None, auto_crop: bool = True) -> Result:
        """Segment one image; every output is written atomically, or none on error.

        ``auto_crop`` (without ``crop``) runs the network on the head's bounding box only
        (:mod:`.head_box`); False runs it on the whole padded volume, as SynthSeg does.
        """
        try:
            return self._segment(input_path, outputs, fast, crop, output_grid, progress, channel, auto_crop)
        finally:
            if self.tune_allocator:
                release_freed_memory()

    def network_input_shape(self, input_path: str | os.PathLike, crop: list[int] | None = None,
                            auto_crop: bool = True, channel: int | None = None) -> tuple[int, int, int]:
        """The shape of the network's input for an image (loads and preprocesses it, no network)."""
        image = load_image(input_path, channel, read_image_header(input_path))
        return tuple(self._preprocess(image, crop, auto_crop).padded.shape)

    def _segment(self, input_path: str | os.PathLike, outputs: Outputs, fast: bool, crop: list[int] | None,
                 output_grid: str, progress: ProgressFn | None, channel: int | None, auto_crop: bool) -> Result:
        report = progress or (lambda stage, f: None)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        report("loading", 0.0)
        for path in (outputs.segmentation, outputs.posteriors, outputs.resampled):
            if path is not None:
                check_output_name(Path(path))
        # sizes come from the header: nothing is allocated for an image that cannot fit
        declared = read_image_header(input_path)
        self._check_memory(declared, self._run_shapes(declared, crop), outputs, output_grid)
        image = load_image(input_path, channel, declared)
        notes = list(image.notes)
        lap("load")
        report("preprocessing", STAGES["preprocessing"][0])
        prep = self._preprocess(image, crop, auto_crop)
        image.data = None  # the network needs only the padded copy: free the original
        lap("preprocess")

        def net_progress(f: float) -> None:
            a, b = STAGES["network"]
            report("network", a + (b - a) * f)

        volume = torch.from_numpy(prep.padded).to(self.device)
        prep.padded = None
        post_t = self._network_posteriors(volume, fast, net_progress)
        del volume
        if not all_finite(post_t):
            raise ModelFileError(f"{input_path}: the network's output holds NaN or infinite values "
                                 "(the model's weights overflow on this image)")
        # (X, Y, Z, C), as SynthSeg's arrays: the network's buffer is laid out so
        post_t = post_t.permute(1, 2, 3, 0)
        post = post_t.cpu().numpy() if post_t.device.type != "cpu" else post_t.numpy()
        del post_t
        lap("network")
        report("postprocessing", STAGES["postprocessing"][0])
        threads = torch.get_num_threads()
        unpad = tuple(slice(lo, lo + n) for (lo, _), n in zip(prep.padding, prep.cropped_shape))
        if fast:
            post, index = postprocess_fast(post, unpad, self.pre.mask_threshold, self.pre.fast_threshold, threads)
        else:
            post, index = postprocess_default(post, topological_classes(self.labels), unpad,
                                              self.pre.mask_threshold, threads)
        seg_ras = np.zeros(prep.ras_shape, dtype=np.int32)
        seg_ras[prep.crop_box] = self._label_map(post, index, prep)
        del index
        row = [subject_name(image.path), *self._volume_values(post, prep, crop)]
        if outputs.posteriors is None and not (output_grid == "input" and prep.grid is not None):
            post = None  # the largest buffer, not written: freed before the writing's copies
        lap("postprocess")
        report("writing", STAGES["writing"][0])
        written, present = self._write(image, prep, seg_ras, post, outputs, output_grid)
        lap("write")
        report("done", 1.0)
        return Result(Path(input_path), outputs, row, self.labels, timings, written, not present, notes,
                      present=present)

    # -- steps a subclass may extend (SynthSeg 2.0's options: :mod:`.synthseg2_pipeline`) ---------
    #: (low, high) intensities are clipped to after resampling, before normalising (``--ct``: 0, 80)
    intensity_clip: tuple[float, float] | None = None

    def _network_posteriors(self, volume: torch.Tensor, fast: bool, progress: Callable[[float], None]
                            ) -> torch.Tensor:
        """Posteriors (C, X, Y, Z) of the padded volume: a view of an (X, Y, Z, C) buffer."""
        flip = None if fast or not self.pre.flip_averaging else flip_indices(self.labels)
        return self.network.posteriors(volume, sigma=self.pre.posterior_smoothing_sigma, flip_indices=flip,
                                       progress=progress)

    def _label_map(self, post: np.ndarray, index: np.ndarray, prep: _Prepared) -> np.ndarray:
        """Label values (RAS, cropped) of the postprocessed posteriors' argmax channels ``index``."""
        return np.asarray(self.labels, dtype=np.int32)[index]

    def _volume_values(self, post: np.ndarray, prep: _Prepared, crop: list[int] | None) -> list[str]:
        """The volumes of the CSV row (after the subject name)."""
        # SynthSeg pastes a cropped result into float64 posteriors: its volumes are float64 then
        sums = soft_volumes(prep.orientation.from_ras(post), dtype=np.float64 if crop else np.float32)
        return volume_row(sums, prep.voxel_volume, with_total=24 in self.labels)

    # ---------------------------------------------------------------------------------------
    def _preprocess(self, image: Image, crop: list[int] | None, auto_crop: bool = True) -> _Prepared:
        target = self.pre.target_resolution_mm
        data, affine, grid = image.data, image.affine, None
        voxel_volume = np.prod(np.asarray(image.zooms[:3], dtype=np.float32))
        if needs_resampling(image.zooms, target, self.pre.resample_tolerance_mm):
            data, affine, grid = resample_to_1mm(data, affine, target)
            voxel_volume = np.float32(target**3)
        resampled = data
        ras, _, orientation = reorient_to_ras(data, affine)
        if self.intensity_clip is not None:
            ras = np.clip(ras, *self.intensity_clip)
        lo, hi = self.pre.intensity_percentiles
        box, min_pad = self._crop_box(ras.shape, crop)
        if crop:  # SynthSeg's --crop: the percentiles are the block's
            norm = normalise(ras[box], lo, hi)
            padding = padding_box(norm.shape, min_pad, self._multiple)
        else:  # the whole volume's percentiles; auto-crop then picks the network's block
            norm = normalise(ras, lo, hi)
            padding = padding_box(norm.shape, min_pad, self._multiple)
            if auto_crop:
                m = self.model.config.size_multiple  # the network's own multiple: a tighter block than 32
                field = network_field(norm, padding, m, m, min_pad[0])
                box, padding = crop_of_field(norm.shape, padding, field)
                norm = norm[box]
        padded = np.pad(norm, padding).astype(np.float32)
        return _Prepared(affine=affine, grid=grid, resampled=resampled if grid is not None else None,
                         orientation=orientation, ras_shape=ras.shape, crop_box=box,
                         cropped_shape=norm.shape, padding=padding, padded=padded,
                         voxel_volume=voxel_volume)

    @property
    def _multiple(self) -> int:
        # SynthSeg pads to multiples of 2**5 (its level count); deeper networks need more
        return max(32, self.model.config.size_multiple)

    def _crop_box(self, ras_shape: tuple[int, ...], crop: list[int] | None
                  ) -> tuple[tuple[slice, slice, slice], list[int]]:
        """``--crop``'s box in the RAS volume and the size the network's input is padded to."""
        multiple = self._multiple
        if crop:
            crop = list(crop) * 3 if len(crop) == 1 else list(crop)
            if len(crop) != 3 or any(int(c) < 1 for c in crop):
                given = " ".join(map(str, crop))
                raise OptionError(f"--crop takes one or three positive sizes (got {given})")
            return centre_crop_box(ras_shape, crop, multiple), [round_up(c, multiple) for c in crop]
        box = (slice(0, ras_shape[0]), slice(0, ras_shape[1]), slice(0, ras_shape[2]))
        return box, [self.pre.min_pad] * 3

    def _run_shapes(self, declared: ImageHeader, crop: list[int] | None) -> RunShapes:
        """The shapes of the arrays segmenting ``declared``'s image makes, from its header alone;
        refused when a grid exceeds :data:`MAX_GRID_SIDE`."""
        target = self.pre.target_resolution_mm
        shape, affine, steps = tuple(declared.shape[:3]), declared.affine, ()
        if needs_resampling(declared.zooms, target, self.pre.resample_tolerance_mm):
            pixdim = np.sqrt(np.sum(affine * affine, axis=0))[:-1]
            rough = tuple(int(np.ceil(n * p / target)) for n, p in zip(shape, pixdim))
            check_grid(rough, f"the {target:g} mm grid", declared.path, _GRID_ADVICE)  # before any array
            g = resample_grid(shape, affine, target).shape
            steps = ((g[0], shape[1], shape[2]), (g[0], g[1], shape[2]), g)
            shape, affine = g, resampled_affine(affine, target)
        check_grid(shape, f"the {target:g} mm grid", declared.path, _GRID_ADVICE)
        ras_shape = tuple(shape[a] for a in orientation_to_ras(affine).axes)
        box, min_pad = self._crop_box(ras_shape, crop)
        crop_shape = tuple(b.stop - b.start for b in box)
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(crop_shape, padding_box(crop_shape, min_pad,
                                                                                   self._multiple)))
        check_grid(padded, "the network's padded input", declared.path,
                   "use a smaller --crop" if crop else "the model's min_pad is too large")
        return RunShapes(declared.stored_values, declared.dtype.itemsize, tuple(declared.shape[:3]), steps,
                         shape, crop_shape, padded)

    def _check_memory(self, declared: ImageHeader, shapes: RunShapes, outputs: Outputs,
                      output_grid: str) -> None:
        """Refuse an image whose run would not fit the memory available, suggesting a ``--crop`` that fits."""
        cfg = self.model.config
        on_gpu = self.device.type == "cuda"
        sizes = {"posterior_bytes": self.network.posterior_dtype.itemsize,
                 "activation_bytes": self.network.dtype.itemsize}

        def need(s: RunShapes) -> int:
            return segmentation_bytes(s, cfg.out_channels, cfg.level_features(), self.network.budget,
                                      posteriors=outputs.posteriors is not None,
                                      input_grid=output_grid == "input", on_gpu=on_gpu, **sizes)

        def advice(available: int) -> str:
            multiple = self._multiple
            largest = round_up(max(shapes.crop_shape), multiple) - multiple
            for c in range(largest, 2 * multiple - 1, -multiple):
                try:
                    if need(self._run_shapes(declared, [c])) <= available:
                        return f"try --crop {c} (segments a centred block of {c}^3 voxels)"
                except ResourceLimitError:
                    continue
            return "a smaller field of view, or a machine with more memory, is needed"

        grid = "x".join(map(str, shapes.grid_shape))
        check_fits(need(shapes), f"{declared.path}: segmenting this image ({grid} grid, network input "
                                 f"{'x'.join(map(str, shapes.padded_shape))})", advice)
        if on_gpu:
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            check_fits(gpu_network_bytes(shapes, cfg.out_channels, cfg.level_features(), self.network.budget,
                                         **sizes),
                       f"{declared.path}: the network's pass on the GPU", "try --crop, or --cpu",
                       available=free)

    def _full_posteriors_ras(self, post: np.ndarray, prep: _Prepared) -> np.ndarray:
        """(X, Y, Z, C) float32 posteriors of the whole (uncropped) RAS volume: background outside the crop."""
        full = np.zeros((*prep.ras_shape, post.shape[-1]), dtype=np.float32)
        full[..., 0] = 1.0
        full[prep.crop_box] = post
        return full

    def _write(self, image: Image, prep: _Prepared, seg_ras: np.ndarray, post: np.ndarray | None,
               outputs: Outputs, output_grid: str) -> tuple[dict[str, Path], list[int]]:
        """Write the outputs; the files written and the labels present in the segmentation written."""
        header = image.header
        written = {"segmentation": outputs.segmentation}
        with OutputTransaction() as tx:
            if outputs.resampled is not None and prep.resampled is not None:
                save_image(prep.resampled, prep.affine, header, tx.temporary(outputs.resampled))
                written["resampled"] = outputs.resampled
            cropped = any(s.stop - s.start != n for s, n in zip(prep.crop_box, prep.ras_shape))
            to_input = output_grid == "input" and prep.grid is not None
            if cropped and (outputs.posteriors is not None or to_input):  # else no whole-grid posteriors
                post_ras = self._full_posteriors_ras(post, prep)
            else:
                post_ras = post
            if to_input:
                seg, post_in = _to_input_grid(prep.orientation.from_ras(post_ras), prep.grid,
                                              self.labels, want_posteriors=outputs.posteriors is not None)
                affine = image.affine
            else:
                seg = np.ascontiguousarray(prep.orientation.from_ras(seg_ras))
                # a view: NIfTI writing copies it one channel at a time
                post_in = prep.orientation.from_ras(post_ras) if outputs.posteriors is not None else None
                affine = prep.affine
            save_image(seg, affine, header, tx.temporary(outputs.segmentation), dtype="int32")
            if outputs.posteriors is not None:
                save_image(post_in, affine, header, tx.temporary(outputs.posteriors), dtype="float32")
                written["posteriors"] = outputs.posteriors
        return written, labels_present(seg)


def all_finite(post: torch.Tensor, rows: int = 8) -> bool:
    """Whether every value of (C, X, Y, Z) posteriors is finite, checked a few rows of X at a time:
    a whole-tensor reduction would allocate a float32 (or bool) copy of a float16 buffer."""
    return all(bool(torch.isfinite(post[:, a:a + rows]).all()) for a in range(0, post.shape[1], rows))


def labels_present(seg: np.ndarray) -> list[int]:
    """The nonzero labels of a label map, ascending (one counting pass, no sort)."""
    counts = np.bincount(np.asarray(seg).ravel().astype(np.intp, copy=False))
    return [int(v) for v in np.flatnonzero(counts[1:]) + 1]


@dataclass
class _Prepared:
    affine: np.ndarray  # affine of the (resampled) image in its own voxel order
    grid: ResampleGrid | None
    resampled: np.ndarray | None
    orientation: Orientation
    ras_shape: tuple[int, int, int]
    crop_box: tuple[slice, slice, slice]
    cropped_shape: tuple[int, int, int]
    padding: tuple[tuple[int, int], ...]
    padded: np.ndarray | None  #: the network's input (dropped once on the network's device)
    voxel_volume: np.floating


def _in_memory_model(model: SynthSegUNet, device: torch.device, labels: Sequence[int] | None,
                     preprocessing: Mapping | Preprocessing | None, name: str) -> tuple[SynthSegUNet, ModelInfo]:
    """A float32 eval-mode copy of ``model`` on ``device`` and its info, checked as a model file's are."""
    if labels is None:
        raise ValueError("an in-memory network needs its output labels (one per output channel)")
    labels = [int(v) for v in labels]
    check_label_list(labels)
    if len(labels) != model.config.out_channels:
        raise ValueError(f"{len(labels)} labels for a network of {model.config.out_channels} output channels")
    if isinstance(preprocessing, Preprocessing):
        preprocessing = preprocessing.to_dict()
    settings = dict(DEFAULT_PREPROCESSING, **(preprocessing or {}))
    check_preprocessing(Path(name), settings)
    copied = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied, ModelInfo(network=model.config, labels=labels, name=name, preprocessing=settings)


_GRID_ADVICE = (f"check the voxel sizes in the header, or crop the image to the head first (the limit is "
                f"{MAX_GRID_SIDE} voxels per side at the model's resolution; --crop applies after "
                "resampling)")


def _input_coordinates(grid: ResampleGrid, axis: int, n_resampled: int) -> np.ndarray:
    """Position of each input voxel along ``axis`` in resampled-grid index units."""
    i = np.arange(grid.input_shape[axis], dtype=np.float64)
    return np.clip((i - grid.start[axis]) / grid.step[axis], 0, n_resampled - 1)


def _to_input_grid(post_xyzc: np.ndarray, grid: ResampleGrid, labels: list[int], want_posteriors: bool
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample 1 mm posteriors (input voxel order) onto the input grid; argmax there."""
    coords = [_input_coordinates(grid, a, post_xyzc.shape[a]) for a in range(3)]
    best = np.full(grid.input_shape, -1.0, dtype=np.float32)
    seg = np.zeros(grid.input_shape, dtype=np.int32)
    post_out = np.empty((*grid.input_shape, post_xyzc.shape[-1]), dtype=np.float32) if want_posteriors else None
    for c, label in enumerate(labels):
        ch = np.ascontiguousarray(post_xyzc[..., c], dtype=np.float32)
        for a in range(3):
            ch = linear_along_axis(ch, a, coords[a])
        better = ch > best
        best[better] = ch[better]
        seg[better] = label
        if post_out is not None:
            post_out[..., c] = ch
    return seg, post_out
