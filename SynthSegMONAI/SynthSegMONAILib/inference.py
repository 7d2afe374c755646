"""Memory-lean, exact evaluation of SynthSeg's network wrapper.

SynthSeg's wrapper (``predict_synthseg.py::build_model``) is: U-Net, softmax, a 3x3x3
Gaussian blur of the posteriors (zero padded), and, unless ``--fast``, the same on the
left-right flipped input, flipped back with left/right channels swapped, averaged 50/50.

Running the U-Net on a whole 256^3 volume at once needs many GB (each top-level
activation is 1.6 GB). Here each level is *streamed* along the first axis: slabs of rows
flow through its convolutions one after the other, and each convolution keeps only the
few rows of overlap its kernel needs from the previous slab. Nothing is computed twice,
zero padding is applied only at the volume's own borders, and the result is the same as
a whole-volume pass. Only the posteriors, the stored skip connections of the lower levels
(overwritten in place by their decoder's output) and one slab's temporaries per stage
are ever in memory: the encoder is a single stream from the input down to the
bottleneck. The top level's skip connection is kept in the posterior buffer, whose rows
it leaves just before their posteriors arrive.

With flip averaging, the lower levels of both passes run first, then both top levels side by
side, the flipped pass's from its last rows back (a stream may run either way), so that both
give the same posterior rows at a time: the posterior buffer fills while the two passes'
inputs to their top levels are consumed, and is never full beside the second pass's skip
connections. The first pass keeps its top skip connection in the posterior buffer for as many
first rows as that allows; the other rows' are recomputed.

The decoder convolutions see ``[skip, upsample(lower)]``; the upsampled half is never
built: a KxKxK convolution of a x2 nearest-neighbour upsampling equals a stride-2 transposed
convolution of the low-resolution volume with (K+1)^3 summed weights, which costs 8/27 of the
full-resolution convolution (for K = 3) and writes its output in place, parities interleaved.

The posterior buffer is laid out voxel by voxel, channels innermost ((X, Y, Z, C), the
channels-last layout of the convolutions): slabs are written into it, and the top skip
connection kept in it, by plain copies. The posterior smoothing is linear and commutes with
the left-right flip (its kernel is symmetric), so with flip averaging it is applied once, to
the averaged posteriors, instead of once per pass.

U-Nets without skip connections at their top ``skip_n_concatenations`` levels (SynthSeg 2.0's
label denoiser, :class:`~.synthseg2_networks.DenoiserUNet`) stream the same way: those levels'
encoder rows are not stored, their decoder's first convolution sees the upsampled lower level
alone (the transposed convolution above, plus its bias), and a skip-less decoder level below the
top writes its output into a buffer of its own. An input may also be a :class:`BuiltInput`,
whose rows are made when its slabs are read (a one-hot of a uint8 map, say): it is never
stored whole. :class:`SlabEncoder` streams SynthSeg 2.0's QC regressor, a pure encoder.

``dtype=torch.bfloat16`` runs the convolutions, and keeps their activations, in bfloat16
(for CPUs with native bf16 instructions, and GPUs); the head, softmax and smoothing stay in
float32, and the posteriors are stored in float16 (half the memory of the largest buffer;
the top skip connection, bfloat16 then, still fits in it). The default, float32 throughout,
is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from .network import SynthSegUNet
from .network_weights import BatchNormWeights, ConvWeights, UNetWeights

ProgressFn = Callable[[float], None]
Rows = Iterator[torch.Tensor]  # successive slabs of a (1, C, X, Y, Z) tensor, rows 0..X in order

MIN_ROWS = 4  # thinner slabs make the convolutions inefficient


class BuiltInput:
    """A network input (1, C, X, Y, Z) that is never stored whole: ``rows(a, b)`` builds its rows
    [a, b) as a (1, C, b - a, Y, Z) tensor when a slab of them is needed."""

    def __init__(self, channels: int, spatial: tuple[int, int, int] | torch.Size,
                 rows: Callable[[int, int], torch.Tensor], device: torch.device | str = "cpu"):
        self.shape = (1, channels, *spatial)
        self.rows = rows
        self.device = torch.device(device)


def gaussian_kernel_3d(sigma: float) -> torch.Tensor:
    """SynthSeg's posterior-smoothing kernel: full 3D Gaussian normalised to sum 1."""
    window = int(np.ceil(2.5 * sigma) / 2) * 2 + 1
    r = np.arange(window) - window // 2
    g = np.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) / (2 * sigma**2))
    return torch.from_numpy((g / g.sum()).astype(np.float32))


def upsampling_deconv_weights(weight: torch.Tensor) -> torch.Tensor:
    """Weights that apply ``weight`` (O, I, K, K, K) to the x2 nearest-neighbour upsampling of a
    volume as a stride-2 transposed convolution of the volume itself (padding K // 2).

    Returns (I, O, K + 1, K + 1, K + 1) weights: along each axis, tap ``t`` of the kernel reaches
    the low-resolution sample of output ``o`` through transposed taps ``2h - t`` and ``2h - t + 1``
    (``h = K // 2``), one for each parity of ``o``.
    """
    k = weight.shape[-1]
    h = k // 2
    a = torch.zeros(k + 1, k, dtype=weight.dtype, device=weight.device)
    for t in range(k):
        a[2 * h - t, t] = 1
        a[2 * h - t + 1, t] = 1
    return torch.einsum("au,bv,cw,oiuvw->ioabc", a, a, a, weight)


class SlabNetwork:
    """Evaluates a :class:`SynthSegUNet`, or its :class:`~.network_weights.UNetWeights`, in streamed
    slabs; see the module docstring. A model with a ``skip_n_concatenations`` attribute
    (:class:`~.synthseg2_networks.DenoiserUNet`) has no skip connections at that many top levels.

    ``slab_budget_mb`` bounds the temporaries of one slab (it sets the slab thickness);
    ``channels_last`` runs the convolutions in the channels-last layout, faster on CPUs;
    ``dtype`` is the convolutions' precision (float32, exact; or bfloat16), ``posterior_dtype``
    the posteriors' storage (float32 or float16; by default float16 with bfloat16 only).
    The model's weights are read once, here: build a new one after changing them.
    """

    def __init__(self, model: SynthSegUNet | UNetWeights, slab_budget_mb: int = 256,
                 channels_last: bool | None = None, dtype: torch.dtype = torch.float32,
                 posterior_dtype: torch.dtype | None = None):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the network runs in float32 or bfloat16, not {dtype}")
        if isinstance(model, torch.nn.Module):
            model = UNetWeights.from_module(model.eval())
        #: the weights read (the model's tensors, not copies)
        self.model = model
        self.budget = slab_budget_mb * 2**20
        self.dtype = dtype
        #: the posteriors' storage: float32, or float16 (the default with bfloat16)
        self.posterior_dtype = posterior_dtype or (torch.float16 if dtype == torch.bfloat16 else torch.float32)
        #: flip averaging with both passes' top levels side by side (:meth:`_flip_averaged`), for the
        #: memory of float32 posteriors; with 16-bit ones (half the buffer) one pass after the other,
        #: which keeps the whole top skip connection instead of recomputing part of it: faster
        self.flip_side_by_side = self.posterior_dtype == torch.float32
        #: called between the stages of a pass, when the temporaries of the one before are freed
        #: (the pipeline hands freed memory back to the system there: :mod:`.allocator`)
        self.between_stages: Callable[[], None] = lambda: None
        #: called after each slab (the pipeline bounds the freed memory kept there: :mod:`.allocator`)
        self.between_slabs: Callable[[], None] = lambda: None
        #: make the posterior buffer resident when it is allocated (so that memory accounting sees
        #: it: :class:`.allocator.FreedMemoryBound`)
        self.touch_buffers = False
        #: told the bytes of skip buffers allocated and not yet written (positive), and of their rows
        #: as they are written (negative): they become resident only then
        self.untouched: Callable[[int], None] = lambda delta: None
        #: hands back the pages of rows a stage has consumed (:func:`.allocator.discard_pages`)
        self.discard_pages: Callable[[torch.Tensor], int] = lambda t: 0
        cfg = model.config
        self.halo = cfg.kernel_size // 2
        self.feats = cfg.level_features()
        #: the top levels without a skip connection (0: every level has one)
        self.skipless = min(model.skip_n_concatenations, cfg.levels - 1)
        device = model.device
        if channels_last is None:
            channels_last = device.type == "cpu"
        self.layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        with torch.no_grad():
            # per conv: (weight of its full-resolution input, bias, weight for the upsampled input)
            self.enc = [[self._weights(c) for c in level.convs] for level in model.encoder]
            self.dec = [[self._weights(c, split=(0 if i < self.skipless else self.feats[i]) if j == 0 else None)
                         for j, c in enumerate(level.convs)] for i, level in enumerate(model.decoder)]
            # the top decoder's BatchNorm folded into the 1x1x1 head: one pass over the slab less
            bn, head = model.decoder[0].bn, model.head
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            w = head.weight
            self.head_weight = (w * scale.view(1, -1, 1, 1, 1)).contiguous(memory_format=self.layout)
            self.head_bias = head.bias + w.flatten(1) @ shift

    def _weights(self, conv: ConvWeights, split: int | None = None):
        """(weight, bias, weight for the upsampled input or None) in the working layout and precision;
        the upsampling weights are summed in float32 before any rounding."""
        w = conv.weight.float()
        up = None
        if split is not None:
            w, up = w[:, :split], self._ready(upsampling_deconv_weights(w[:, split:]))
        return self._ready(w), conv.bias.to(self.dtype), up

    def _ready(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.dtype).contiguous(memory_format=self.layout)

    # -- building blocks -------------------------------------------------------------
    def _conv(self, weights, window: torch.Tensor, olo: int, ohi: int,
              low: torch.Tensor | None = None) -> torch.Tensor:
        """'Same' conv + ELU giving rows [olo, ohi) from the window of input rows
        [olo - halo, ohi + halo) (zero rows beyond the volume's borders included).

        ``low`` is the lower level's output when this conv also sees its x2 upsampling
        (the first decoder conv).
        """
        w, bias, w_up = weights
        h = self.halo
        y = F.conv3d(window, w, bias, padding=(0, h, h))
        if low is not None:
            self._add_upsampled_conv(y, low, w_up, olo, ohi)
        return F.elu(y, inplace=True)

    def _add_upsampled_conv(self, y: torch.Tensor, low: torch.Tensor, w_up: torch.Tensor,
                            olo: int, ohi: int) -> None:
        """Add to ``y`` (rows [olo, ohi)) the conv of the x2 upsampling of ``low``, computed as a
        transposed convolution of the rows of ``low`` that reach them (``w_up``:
        :func:`upsampling_deconv_weights`)."""
        h, m = self.halo, low.shape[2]
        r0 = max((olo - h) // 2, 0)  # rows of `low` whose upsampled rows are in the windows of [olo, ohi)
        r1 = min((ohi - 1 + h) // 2 + 1, m)
        z = F.conv_transpose3d(low[:, :, r0:r1], w_up, stride=2, padding=(0, h, h))
        first = 2 * r0 - h  # the row of `y`'s volume that z's first row is
        y += z[:, :, olo - first: ohi - first]

    def _upsampled_stream(self, low: torch.Tensor, n: int, convs, rows: int,
                          then: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          reverse: bool = False) -> Rows:
        """A decoder level without skip connection as a stream of ``n`` rows: its first conv sees
        the x2 upsampling of ``low`` alone (no input rows to read), the others as usual."""
        (w, bias, w_up), rest = convs[0], convs[1:]

        def first() -> Rows:
            shape = (1, w.shape[0], 0, *(2 * s for s in low.shape[3:]))
            for a, b in self._row_ranges(n, rows, reverse):
                y = torch.zeros(shape[:2] + (b - a,) + shape[3:], dtype=low.dtype, device=low.device
                                ).contiguous(memory_format=self.layout)
                self._add_upsampled_conv(y, low, w_up, a, b)
                y = F.elu(y.add_(bias.view(1, -1, 1, 1, 1)), inplace=True)
                yield then(y) if then is not None and not rest else y
                del y

        return self._conv_stream(first(), n, rest, then=then, reverse=reverse) if rest else first()

    def _posteriors_of(self, f: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
        """Softmax, in float32, of the head's output for the top decoder's slab ``f`` (channels
        reordered as ``channels`` when given: a free left-right label swap)."""
        w, b = self.head_weight, self.head_bias
        if channels is not None:
            w, b = w[channels], b[channels]
        logits = F.conv3d(f.float(), w, b)
        # softmax along the last axis is much faster than along a strided channel axis
        return torch.softmax(logits.movedim(1, -1), -1).movedim(-1, 1)

    @staticmethod
    def _rows_xyzc(p: torch.Tensor) -> torch.Tensor:
        """(1, C, R, Y, Z) slab as an (R, Y, Z, C) view (contiguous when ``p`` is channels-last)."""
        return p[0].permute(1, 2, 3, 0)

    @staticmethod
    def _slabs(t: torch.Tensor, rows: int) -> Rows:
        for a in range(0, t.shape[2], rows):
            yield t[:, :, a:a + rows]

    @staticmethod
    def _stream(slabs: Rows, n: int, halo: int,
                step: Callable[[torch.Tensor, int, int], torch.Tensor], reverse: bool = False) -> Rows:
        """Apply a 'same' operator of half-width ``halo`` along the rows of a stream.

        ``step(window, olo, ohi)`` gives output rows [olo, ohi) from the input rows
        [olo - halo, ohi + halo), zero rows standing in beyond the volume's borders. Each
        slab is joined to the ``2 * halo`` rows kept from the one before, so no row is
        computed twice. ``reverse``: the slabs come from the last rows to the first (each
        slab's own rows in order), and so do the output slabs.
        """
        buf, buf_lo, have, done, cap = None, 0, 0, n if reverse else 0, 1
        for slab in slabs:
            have += slab.shape[2]
            cap = max(cap, slab.shape[2])
            buf = slab if buf is None else torch.cat([slab, buf] if reverse else [buf, slab], 2)
            del slab  # hold no slab longer than needed: memory is the point of streaming
            if reverse:
                buf_lo = n - have
                lo, hi = (0 if have == n else buf_lo + halo), done
            else:
                lo, hi = done, (n if have == n else have - halo)
            if hi <= lo:
                continue
            # no step gives more rows than the largest slab: the rows held back for the last one
            # come as a slab of their own, so the stream's temporaries never grow at its end
            chunks = [(a, min(a + cap, hi)) for a in range(lo, hi, cap)]
            for k, (olo, ohi) in enumerate(reversed(chunks) if reverse else chunks):
                wlo, whi = olo - halo, ohi + halo
                window = buf[:, :, max(wlo, 0) - buf_lo: min(whi, n) - buf_lo]
                if wlo < 0 or whi > n:
                    window = F.pad(window, (0, 0, 0, 0, max(0, -wlo), max(0, whi - n)))
                out = [step(window, olo, ohi)]
                del window
                if k == len(chunks) - 1:
                    # keep the rows the next outputs read, copied before the consumer may overwrite
                    # the input they view (a decoder writes its output over its skip connection)
                    if reverse:  # rows [lo - halo, lo + halo)
                        buf = buf[:, :, : min(lo + halo, n) - buf_lo].clone() if lo > 0 else None
                        done = lo
                    else:
                        keep = max(hi - halo, 0)
                        buf = buf[:, :, keep - buf_lo:].clone() if hi < n else None
                        buf_lo, done = keep, hi
                yield out.pop()

    @staticmethod
    def _row_ranges(n: int, rows: int, reverse: bool = False) -> list[tuple[int, int]]:
        """[a, b) slabs of ``rows`` rows covering [0, n): from the first row on, or from the last
        row back (the thinner remainder then comes last, at the volume's start)."""
        if reverse:
            return [(max(b - rows, 0), b) for b in range(n, 0, -rows)]
        return [(a, min(a + rows, n)) for a in range(0, n, rows)]

    def share_memory_hooks(self, other: SlabNetwork) -> None:
        """Take ``other``'s memory handling (the hooks and buffer touching the pipeline set on it)."""
        for name in ("between_stages", "between_slabs", "touch_buffers", "untouched", "discard_pages"):
            setattr(self, name, getattr(other, name))

    def _buffer(self, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
        """A long-lived buffer (``torch.empty``'s arguments), resident at once if :attr:`touch_buffers`."""
        t = torch.empty(shape, **kwargs)
        return t.zero_() if self.touch_buffers else t

    def _skip_buffer(self, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
        """A skip connection's buffer, left untouched (the encoder writes its rows in order: resident
        only the rows written so far, which :attr:`untouched` is told)."""
        t = torch.empty(shape, **kwargs)
        self.untouched(t.numel() * t.element_size())
        return t

    def _rows_for(self, channels: int, cross_section: int) -> int:
        """Slab thickness whose temporaries (``channels`` per row) fit in the budget."""
        rows = self.budget // max(1, channels * cross_section * 4)
        rows = max(MIN_ROWS, int(rows))
        return rows - rows % 2

    def _conv_stream(self, slabs: Rows, n: int, convs, low: torch.Tensor | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None, reverse: bool = False) -> Rows:
        """A level's convolutions as a stream (``reverse``: :meth:`_stream`'s); ``then`` is applied
        to the last one's slabs."""
        for j, weights in enumerate(convs):
            up = low if j == 0 else None
            last = then if j == len(convs) - 1 else None

            def step(win, lo, hi, weights=weights, up=up, last=last):
                y = self._conv(weights, win, lo, hi, up)
                return last(y) if last else y

            slabs = self._stream(slabs, n, self.halo, step, reverse)
        return slabs

    # -- stream stages -----------------------------------------------------------------
    def _input_slabs(self, x: torch.Tensor, rows: int, flipped: bool, reverse: bool = False,
                     start: int = 0) -> Rows:
        """Slabs of ``x``, or of ``x`` flipped along its first axis, in the working layout
        (``reverse``: from the last rows to the first); rows from ``start`` on."""
        n = x.shape[2]
        if isinstance(x, BuiltInput) and flipped:
            raise ValueError("a built input has no flip pass")
        for a, b in self._row_ranges(n - start, rows, reverse):
            a, b = a + start, b + start
            if isinstance(x, BuiltInput):
                slab = x.rows(a, b)
            else:
                slab = x[:, :, n - b: n - a].flip(2) if flipped else x[:, :, a:b]
            yield slab.to(self.dtype).contiguous(memory_format=self.layout)

    @staticmethod
    def _rebatched(slabs: Rows, rows: int) -> Rows:
        """The same rows in slabs of at least ``rows`` (the last may be thinner)."""
        pending, count = [], 0
        for slab in slabs:
            pending.append(slab)
            count += slab.shape[2]
            del slab
            if count >= rows:
                out = [pending[0] if len(pending) == 1 else torch.cat(pending, 2)]
                pending, count = [], 0
                yield out.pop()
        if pending:
            yield torch.cat(pending, 2)

    def _stored(self, slabs: Rows, store: torch.Tensor | None, on_rows: Callable[[int], None]) -> Rows:
        """Pass slabs on, copying them into ``store`` (rows in order, as many as it has) when one is given."""
        pos = 0
        for slab in slabs:
            if store is not None and pos < store.shape[2]:
                k = min(slab.shape[2], store.shape[2] - pos)
                store[:, :, pos:pos + k].copy_(slab[:, :, :k])
            pos += slab.shape[2]
            on_rows(slab.shape[2])
            out = [slab]
            del slab
            yield out.pop()

    @staticmethod
    def _pooled(slabs: Rows, bn: BatchNormWeights) -> Rows:
        """2x2x2 max-pooling of BatchNorm(slabs), normalised in place; an odd row waits for the next
        slab, and is pooled with its first row alone (no copy of the slab)."""
        carry = None
        for slab in slabs:
            g = bn.into(slab, slab)
            del slab
            parts, start = [], 0
            if carry is not None:
                parts.append(F.max_pool3d(torch.cat([carry, g[:, :, :1]], 2), 2))
                start = 1
            odd = (g.shape[2] - start) % 2
            if g.shape[2] - start > odd:
                parts.append(F.max_pool3d(g[:, :, start: g.shape[2] - odd], 2))
            carry = g[:, :, -1:].clone() if odd else None
            del g
            if parts:
                out = [parts[0] if len(parts) == 1 else torch.cat(parts, 2)]
                del parts
                yield out.pop()

    def _bottom(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck level (convolutions, ELU, BatchNorm) on its whole, small input."""
        h = self.halo
        for w, bias, _ in self.enc[-1]:
            x = F.elu(F.conv3d(x, w, bias, padding=h), inplace=True)
        return self.model.encoder[-1].bn(x)

    def _consumed_rows(self, low: torch.Tensor, reverse: bool = False) -> Callable[[int], None]:
        """``consumed(pos)``, called once a decoder level's output rows [0, pos) are out (``reverse``:
        rows [pos, end)), hands back the rows of its lower level's output ``low`` that no later row
        reads: a transposed convolution for rows from ``pos`` on reads rows from ``(pos - halo) // 2``
        on (for rows before ``pos``, rows up to ``(pos - 1 + halo) // 2``); one row more is kept, and
        the level's later convolutions lag behind its first."""
        m = low.shape[2]
        state = {"gone": m if reverse else 0}  # rows [gone, m) handed back (reverse), or [0, gone)

        def consumed(pos: int) -> None:
            if reverse:
                keep = min(max((pos - 1 + self.halo) // 2 + 2, 0), m)
                if keep < state["gone"]:
                    self.discard_pages(low[:, :, keep:state["gone"]])
                    state["gone"] = keep
                return
            keep = min(max((pos - self.halo) // 2 - 1, 0), m)
            if keep > state["gone"]:
                self.discard_pages(low[:, :, state["gone"]:keep])
                state["gone"] = keep

        return consumed

    # -- one pass --------------------------------------------------------------------
    def _level_work(self) -> list[float]:
        """Each level's share of a pass's multiply-adds, roughly (for progress)."""
        return [8.0**-i * f**2 for i, f in enumerate(self.feats)]

    def _pass_work(self, stored_skip0: bool) -> float:
        """A pass's work in :meth:`_level_work`'s units; the top level's skip connection recomputed
        unless it is stored (or there is none)."""
        work = self._level_work()
        return 2 * sum(work[:-1]) + work[-1] + (0 if stored_skip0 or self.skipless else work[0])

    def _advancer(self, total: float, progress: ProgressFn | None) -> Callable[[float], None]:
        """``advance(work)``: called after each slab, reports the fraction of ``total`` done."""
        state = {"done": 0.0}

        def advance(amount: float) -> None:
            self.between_slabs()
            state["done"] += amount
            if progress:
                progress(min(1.0, state["done"] / total))

        return advance

    def _pass(self, x: torch.Tensor | BuiltInput, flipped: bool, emit: Callable[[int, int, torch.Tensor], None],
              progress: ProgressFn | None, skip0: torch.Tensor | None = None,
              channels: torch.Tensor | None = None) -> None:
        """Run the network on ``x`` (1, 1, X, Y, Z), or on ``x`` flipped along X;
        emit(a, b, posteriors[a:b]) per slab, in order, channels reordered as ``channels``
        (unsmoothed softmax, float32).

        ``skip0``, when given, is a (1, F, X, Y, Z) buffer for the top level's skip
        connection, which is then stored instead of recomputed. It may be the posterior
        buffer itself: its rows are read before their posteriors are emitted. ``x`` may be a
        :class:`BuiltInput` (not flipped).
        """
        if self.skipless:
            skip0 = None  # no top skip connection to keep
        advance = self._advancer(self._pass_work(skip0 is not None), progress)
        low = self._lower(x, flipped, advance, skip0)
        for a, b, p in self._top(x, flipped, low, channels, advance, skip0):
            emit(a, b, p)
            del p

    def _lower(self, x: torch.Tensor | BuiltInput, flipped: bool, advance: Callable[[float], None],
               skip0: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder and the decoder levels below the top, on ``x`` or on ``x`` flipped along X:
        returns the output of the level below the top (whose rows the top level consumes).

        ``skip0``: see :meth:`_pass`. ``advance`` is told each slab's work (:meth:`_level_work`)."""
        model, feats, dtype, k = self.model, self.feats, self.dtype, self.skipless
        levels = len(model.encoder)
        size = [[s // 2**i for s in x.shape[2:]] for i in range(levels)]
        cross = [s[1] * s[2] for s in size]
        work = self._level_work()
        # encoder: one stream from the input down to the bottleneck's input
        skips: list[torch.Tensor | None] = [None] * levels
        stream = self._input_slabs(x, self._rows_for(4 * feats[0], cross[0]), flipped)
        for i in range(levels - 1):
            level, n = model.encoder[i], size[i][0]
            if i > 0:
                stream = self._rebatched(stream, self._rows_for(4 * feats[i], cross[i]))
            row_bytes = 0
            if i >= max(k, 1):
                skips[i] = self._skip_buffer((1, feats[i], *size[i]), dtype=dtype, device=x.device,
                                             memory_format=self.layout)
                row_bytes = skips[i][:, :, :1].numel() * skips[i].element_size()

            def on_rows(rows: int, i=i, n=n, row_bytes=row_bytes) -> None:
                if row_bytes:
                    self.untouched(-rows * row_bytes)
                advance(work[i] * rows / n)

            stream = self._conv_stream(stream, n, self.enc[i])
            stream = self._stored(stream, skips[i] if i > 0 else skip0, on_rows)
            stream = self._pooled(stream, level.bn)
        low = self._bottom(torch.cat(list(stream), 2))
        self.between_stages()
        advance(work[-1])
        for i in range(levels - 2, 0, -1):  # decoder below the top: output replaces the skip
            level, n, skip = model.decoder[i], size[i][0], skips[i]
            pos = 0
            rows = self._rows_for(6 * feats[i], cross[i])
            if i < k:  # no skip connection: the output goes to a buffer of its own
                skip = self._buffer((1, feats[i], *size[i]), dtype=dtype, device=x.device,
                                   memory_format=self.layout)
                stream = self._upsampled_stream(low, n, self.dec[i], rows)
            else:
                # rows of `skip` are read (and copied) by the stream before they are overwritten
                stream = self._conv_stream(self._slabs(skip, rows), n, self.dec[i], low)
            consumed = self._consumed_rows(low)
            for f in stream:
                level.bn.into(f, skip[:, :, pos:pos + f.shape[2]])
                pos += f.shape[2]
                consumed(pos)
                advance(work[i] * f.shape[2] / n)
                del f
            skips[i], low = None, skip
            del stream
            self.between_stages()
        return low

    def _recomputed_skip0(self, x: torch.Tensor, start: int, rows: int) -> Rows:
        """The top level's skip connection (its encoder convolutions) for rows [start, X) of ``x``,
        streamed from the rows its convolutions reach back to."""
        lo = max(start - len(self.enc[0]) * self.halo, 0)
        stream = self._conv_stream(self._input_slabs(x, rows, False, start=lo), x.shape[2] - lo, self.enc[0])
        drop = start - lo  # rows computed only for the convolutions' overlap
        for slab in stream:
            if drop >= slab.shape[2]:
                drop -= slab.shape[2]
                continue
            out = [slab[:, :, drop:]]
            drop = 0
            del slab
            yield out.pop()

    def _top(self, x: torch.Tensor | BuiltInput, flipped: bool, low: torch.Tensor,
             channels: torch.Tensor | None, advance: Callable[[float], None],
             skip0: torch.Tensor | None = None, reverse: bool = False) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The top level of a pass whose lower levels gave ``low`` (:meth:`_lower`): the level-0
        skip connection (stored in ``skip0``, or recomputed), decoder, head and softmax, yielding
        (a, b, posteriors of rows [a, b)) slab by slab, from the first rows (``reverse``: from
        the last). ``low``'s rows are handed back as they are consumed."""
        model, feats, dtype, k = self.model, self.feats, self.dtype, self.skipless
        n = x.shape[2]
        cross = x.shape[3] * x.shape[4]
        n_out = model.config.out_channels
        rows = self._rows_for(max(6 * feats[0], 4 * n_out), cross)
        work = self._level_work()
        top_work = work[0]
        then = lambda f: self._posteriors_of(f, channels)  # noqa: E731
        if k:
            stream = self._upsampled_stream(low, n, self.dec[0], rows, then=then, reverse=reverse)
        elif skip0 is not None:
            if reverse:
                raise ValueError("a stored top skip connection is read from its first rows")
            m = skip0.shape[2]  # the rows stored; the others are recomputed

            def stored_skip0() -> Rows:
                for a, b in self._row_ranges(m, rows):
                    slab = torch.empty((1, feats[0], b - a, *x.shape[3:]), dtype=dtype,
                                       device=x.device, memory_format=self.layout)
                    slab.copy_(skip0[:, :, a:b])
                    yield slab
                    del slab
                if m < n:
                    yield from self._recomputed_skip0(x, m, rows)

            stream = stored_skip0()
            top_work = work[0] * (2 - m / n)
        else:
            stream = self._conv_stream(self._input_slabs(x, rows, flipped, reverse), n, self.enc[0],
                                       reverse=reverse)
            top_work = 2 * work[0]
        if not k:
            stream = self._conv_stream(stream, n, self.dec[0], low, then=then, reverse=reverse)
        pos = n if reverse else 0
        consumed = self._consumed_rows(low, reverse)
        del low  # the streams hold it while they read it
        for p in stream:
            a, b = (pos - p.shape[2], pos) if reverse else (pos, pos + p.shape[2])
            pos = a if reverse else b
            yield a, b, p
            del p
            consumed(pos)
            advance(top_work * (b - a) / n)

    def _smooth(self, out: torch.Tensor, sigma: float) -> None:
        """SynthSeg's Gaussian smoothing of the (X, Y, Z, C) posteriors, in place, slab by slab
        (zero padding at the borders; computed in float32)."""
        n, n_out = out.shape[0], out.shape[-1]
        kernel = gaussian_kernel_3d(sigma).to(out.device)
        h = kernel.shape[0] // 2
        w = kernel[None, None].expand(n_out, 1, *kernel.shape).contiguous(memory_format=self.layout)
        rows = max(self._rows_for(2 * n_out, out.shape[1] * out.shape[2]), h)
        before = out.new_zeros((h, *out.shape[1:]))  # the unsmoothed rows above the slab
        for a in range(0, n, rows):
            b = min(a + rows, n)
            below = out[b: b + h]
            pad = out.new_zeros((h - below.shape[0], *out.shape[1:]))
            window = torch.cat([before, out[a:b], below, pad], 0)
            before = window[b - a: b - a + h].clone()
            window = window.permute(3, 0, 1, 2)[None].to(torch.float32, memory_format=self.layout)
            y = F.conv3d(window, w, groups=n_out, padding=(0, h, h))
            out[a:b].copy_(self._rows_xyzc(y))
            del window, y
            self.between_slabs()

    def _flip_averaged(self, x: torch.Tensor, channels: torch.Tensor, progress: ProgressFn | None) -> torch.Tensor:
        """The average of the posteriors of ``x`` and of ``x`` flipped along X (flipped back, channels
        reordered as ``channels``), unsmoothed, in an (X, Y, Z, C) buffer.

        The lower levels of both passes run first; then both top levels run side by side, the
        flipped one from its last rows back, so that both give the same posterior rows at a time:
        the posterior buffer fills while both passes' inputs to their top levels are consumed, and
        is never full beside them. Each row is the first pass's value plus the second's, halved,
        as in SynthSeg. The first pass keeps its top skip connection in the posterior buffer for as
        many first rows as leave the second pass's lower levels no higher than that end state
        (:meth:`_stored_top_rows`); the other rows' are recomputed.
        """
        n = x.shape[2]
        out = torch.empty((*x.shape[2:], self.model.config.out_channels), dtype=self.posterior_dtype,
                          device=x.device)
        row_bytes = out[0].numel() * out.element_size()
        m = self._stored_top_rows(out)
        skip0 = self._top_skip_in(out[:m]) if m else None
        if m and self.touch_buffers:
            out[:m].zero_()
        self.untouched((n - m) * row_bytes)  # the other rows are written in order, later
        work = self._level_work()
        advance = self._advancer(2 * self._pass_work(False) - work[0] * m / n, progress)
        low = self._lower(x, False, advance, skip0)
        low_flipped = self._lower(x, True, advance)
        top = self._top(x, False, low, None, advance, skip0)
        top_flipped = self._top(x, True, low_flipped, channels, advance, reverse=True)
        del low, low_flipped, skip0
        done = 0  # rows [0, done) hold the first pass's posteriors
        for a, b, p in top_flipped:  # flipped rows [a, b): rows [n - b, n - a), last first
            while done < n - a:
                a1, b1, p1 = next(top)
                out[a1:b1].copy_(self._rows_xyzc(p1))
                self.untouched(-(max(b1, m) - max(a1, m)) * row_bytes)
                done = b1
                del p1
            self._add_flipped(out, a, b, p)
            del p
        next(top, None)  # every row is out: this runs the first pass's last bookkeeping
        return out

    def _flip_one_after_the_other(self, x: torch.Tensor, channels: torch.Tensor, progress: ProgressFn | None
                                  ) -> torch.Tensor:
        """:meth:`_flip_averaged`'s result the plain way: the first pass whole, keeping its whole top
        skip connection in the posterior buffer, then the flipped pass added to it."""
        out = self._buffer((*x.shape[2:], self.model.config.out_channels), dtype=self.posterior_dtype,
                           device=x.device)
        skip0 = self._top_skip_in(out)
        work = self._pass_work(skip0 is not None)
        advance = self._advancer(work + self._pass_work(False), progress)
        low = self._lower(x, False, advance, skip0)
        for a, b, p in self._top(x, False, low, None, advance, skip0):
            out[a:b].copy_(self._rows_xyzc(p))
            del p
        del low
        self.between_stages()
        low = self._lower(x, True, advance)
        for a, b, p in self._top(x, True, low, channels, advance):
            self._add_flipped(out, a, b, p)
            del p
        return out

    def _add_flipped(self, out: torch.Tensor, a: int, b: int, p: torch.Tensor) -> None:
        """Average into ``out``'s rows (which hold the first pass's posteriors) the flipped pass's
        posteriors ``p`` of its rows [a, b): rows [X - b, X - a) of ``out``, in reverse order."""
        n, rows = out.shape[0], self._rows_xyzc(p)
        for r in range(b - a):
            out[n - 1 - a - r].add_(rows[r]).mul_(0.5)

    def _top_skip_in(self, out: torch.Tensor) -> torch.Tensor | None:
        """The top level's skip connection (1, F, X, Y, Z) as a view of the rows of the posterior
        buffer ``out`` (X, Y, Z, C) (bfloat16 in a float16 buffer: the same size), or None if it does
        not fit in them (or the model has none)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.skipless or out.shape[-1] < self.feats[0] or out.element_size() != size:
            return None
        return out.view(self.dtype).permute(3, 0, 1, 2)[None, : self.feats[0]]

    def _stored_top_rows(self, out: torch.Tensor) -> int:
        """How many first rows of the posterior buffer ``out`` (X, Y, Z, C) keep the first pass's top
        skip connection during a flip-averaged run (0 when it does not fit in a row, or the model has
        none there): as many as leave the buffers resident while the second pass's lower levels run
        (those rows, that pass's skip connections, the first pass's output below the top) no larger
        than the whole posterior buffer, which the top levels' end holds. (With one slab budget more
        rows, the two stages measured the same peak, a little above this one's.)"""
        n, n_out = out.shape[0], out.shape[-1]
        if self._top_skip_in(out[:0]) is None:
            return 0
        lower = sum(f * 8.0**-i for i, f in enumerate(self.feats[1:-1], 1)) + self.feats[1] / 8
        return max(0, int(n * (1 - lower / n_out)))

    @torch.no_grad()
    def posteriors(self, volume: torch.Tensor, sigma: float | None = 0.5,
                   flip_indices: np.ndarray | None = None, progress: ProgressFn | None = None
                   ) -> torch.Tensor:
        """Smoothed posteriors (C, X, Y, Z) of a padded volume (X, Y, Z), flip-averaged if asked,
        in :attr:`posterior_dtype`.

        The result is a view of a buffer laid out (X, Y, Z, C): ``.permute(1, 2, 3, 0)`` is contiguous.
        """
        x = volume[None, None]
        n_out = self.model.config.out_channels
        self.between_stages()
        if flip_indices is None:
            out = self._buffer((*volume.shape, n_out), dtype=self.posterior_dtype, device=volume.device)
            skip0 = self._top_skip_in(out)

            def write_direct(a, b, p):
                out[a:b].copy_(self._rows_xyzc(p))

            self._pass(x, False, write_direct, progress, skip0=skip0)
        elif self.flip_side_by_side:
            out = self._flip_averaged(x, torch.as_tensor(np.asarray(flip_indices), device=volume.device), progress)
        else:
            out = self._flip_one_after_the_other(x, torch.as_tensor(np.asarray(flip_indices), device=volume.device),
                                                 progress)
        self.between_stages()
        if sigma:
            self._smooth(out, sigma)
            self.between_stages()
        return out.permute(3, 0, 1, 2)


class SlabEncoder:
    """Evaluates SynthSeg 2.0's QC regressor (:class:`~.synthseg2_networks.QualityControlNet`) in
    streamed slabs of rows, exactly as its ``forward``.

    Each residual level (ReLU conv, conv, plus the level's input or its ReLU conv, ReLU,
    BatchNorm, 2x2x2 max-pooling with ``ceil_mode``) is two row streams (:meth:`SlabNetwork._stream`):
    the first carries [ReLU conv, residual] of its rows, the second adds the second conv. The last
    level's output (14^3 at 224^3) goes through the final convolutions whole, then the mean over space.
    """

    def __init__(self, net: torch.nn.Module, slab_budget_mb: int = 256, channels_last: bool | None = None):
        self.net = net.eval()
        self.budget = slab_budget_mb * 2**20
        device = next(net.parameters()).device
        if channels_last is None:
            channels_last = device.type == "cpu"
        self.layout = torch.channels_last_3d if channels_last else torch.contiguous_format

        def ready(conv):
            if conv is None:
                return None
            w = conv.weight.detach().float().contiguous(memory_format=self.layout)
            return w, conv.bias.detach().float(), conv.kernel_size[0] // 2

        self.levels = [(ready(lv.conv0), ready(lv.conv1), ready(lv.expand), lv.bn) for lv in net.levels]

    _rows_for = SlabNetwork._rows_for  # the same slab thickness for the same budget

    def _input_slabs(self, x: torch.Tensor | BuiltInput, rows: int) -> Rows:
        n = x.shape[2]
        for a in range(0, n, rows):
            b = min(a + rows, n)
            slab = x.rows(a, b) if isinstance(x, BuiltInput) else x[:, :, a:b]
            yield slab.float().contiguous(memory_format=self.layout)

    @staticmethod
    def _pooled(slabs: Rows, n: int) -> Rows:
        """2x2x2 max-pooling (``ceil_mode``) of an ``n``-row stream; an odd row waits for the next
        slab, except the volume's last, pooled alone."""
        carry, seen = None, 0
        for slab in slabs:
            seen += slab.shape[2]
            g = slab if carry is None else torch.cat([carry, slab], 2)
            del slab
            odd = g.shape[2] % 2 if seen < n else 0
            carry = g[:, :, -1:].clone() if odd else None
            if g.shape[2] > odd:
                out = [F.max_pool3d(g[:, :, : g.shape[2] - odd], 2, ceil_mode=True)]
                del g
                yield out.pop()

    def _level(self, slabs: Rows, n: int, conv0, conv1, expand, bn: torch.nn.Module) -> Rows:
        (w0, b0, h), (w1, b1, _) = conv0, conv1
        c = w0.shape[0]

        def first(win: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            a = F.relu(F.conv3d(win, w0, b0, padding=(0, h, h)), inplace=True)
            if expand is not None:
                we, be, he = expand
                r = F.relu(F.conv3d(win[:, :, h - he: win.shape[2] - (h - he)], we, be, padding=(0, he, he)),
                           inplace=True)
            else:
                r = win[:, :, h: h + hi - lo]
            return torch.cat([a, r], 1)

        def second(win: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            y = F.conv3d(win[:, :c], w1, b1, padding=(0, h, h))
            y += win[:, c:, h: h + hi - lo]
            return bn(F.relu(y, inplace=True))

        stream = SlabNetwork._stream(slabs, n, h, first)
        stream = SlabNetwork._stream(stream, n, h, second)
        return self._pooled(stream, n)

    @torch.no_grad()
    def scores(self, x: torch.Tensor | BuiltInput) -> torch.Tensor:
        """The network's output (1, C) for an input (1, C_in, X, Y, Z), streamed."""
        size = list(x.shape[2:])
        stream: Rows | None = None
        for conv0, conv1, expand, bn in self.levels:
            c = conv0[0].shape[0]
            rows = self._rows_for(6 * c, size[1] * size[2])
            stream = self._input_slabs(x, rows) if stream is None else SlabNetwork._rebatched(stream, rows)
            stream = self._level(stream, size[0], conv0, conv1, expand, bn)
            size = [-(-s // 2) for s in size]
        y = torch.cat(list(stream), 2)
        net = self.net
        y = F.relu(net.final1(F.relu(net.final0(y))))
        return y.mean(dim=(2, 3, 4))
