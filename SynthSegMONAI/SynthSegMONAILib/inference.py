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
(overwritten in place by their decoder's output) and one slab's temporaries are ever in
memory. The top level's skip connection is recomputed as part of the final stream
instead of being stored.

The decoder convolutions see ``[skip, upsample(lower)]``; the upsampled half is never
built: a 3x3x3 convolution of a x2 nearest-neighbour upsampling equals, for each of the 8
output parities, a 2x2x2 convolution of the low-resolution volume with summed weights,
which costs 8/27 of the full-resolution convolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import product

import numpy as np
import torch
from torch.nn import functional as F

from .network import SynthSegUNet

ProgressFn = Callable[[float], None]
Rows = Iterator[torch.Tensor]  # successive slabs of a (1, C, X, Y, Z) tensor, rows 0..X in order

MIN_ROWS = 4  # thinner slabs make the convolutions inefficient


def gaussian_kernel_3d(sigma: float) -> torch.Tensor:
    """SynthSeg's posterior-smoothing kernel: full 3D Gaussian normalised to sum 1."""
    window = int(np.ceil(2.5 * sigma) / 2) * 2 + 1
    r = np.arange(window) - window // 2
    g = np.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) / (2 * sigma**2))
    return torch.from_numpy((g / g.sum()).astype(np.float32))


def _parity_offsets(halo: int) -> tuple[int, int, int]:
    """For a kernel of half-width ``halo`` seen through x2 nearest upsampling: the number
    of low-resolution taps per axis, the first tap's offset for even outputs, and how much
    later odd outputs' windows start."""
    first_even, first_odd = (-halo) // 2, (1 - halo) // 2
    return halo + 1, first_even, first_odd - first_even


def upsampling_conv_weights(weight: torch.Tensor) -> torch.Tensor:
    """Weights that apply ``weight`` (O, I, K, K, K) to the x2 nearest-neighbour upsampling
    of a volume by convolving the volume itself.

    Returns (8 * O, I, T, T, T) weights, T = K // 2 + 1, one block of O per output parity
    (px, py, pz) in ``itertools.product((0, 1), repeat=3)`` order.
    """
    k = weight.shape[-1]
    h = k // 2
    taps, _, _ = _parity_offsets(h)
    combine = []
    for p in (0, 1):
        first = (p - h) // 2
        a = torch.zeros(taps, k, dtype=weight.dtype, device=weight.device)
        for j in range(k):
            a[(p + j - h) // 2 - first, j] = 1
        combine.append(a)
    blocks = [torch.einsum("au,bv,cw,oiuvw->oiabc", combine[px], combine[py], combine[pz], weight)
              for px, py, pz in product((0, 1), repeat=3)]
    return torch.cat(blocks, 0)


class SlabNetwork:
    """Evaluates a :class:`SynthSegUNet` in streamed slabs; see the module docstring.

    ``slab_budget_mb`` bounds the temporaries of one slab (it sets the slab thickness);
    ``channels_last`` runs the convolutions in the channels-last layout, faster on CPUs.
    """

    def __init__(self, model: SynthSegUNet, slab_budget_mb: int = 256, channels_last: bool | None = None):
        self.model = model.eval()
        self.budget = slab_budget_mb * 2**20
        cfg = model.config
        self.halo = cfg.kernel_size // 2
        self.feats = cfg.level_features()
        device = next(model.parameters()).device
        if channels_last is None:
            channels_last = device.type == "cpu"
        self.layout = torch.channels_last_3d if channels_last else torch.contiguous_format
        with torch.no_grad():
            # per conv: (weight of its full-resolution input, bias, weight for the upsampled input)
            self.enc = [[self._weights(c.conv) for c in level.convs] for level in model.encoder]
            self.dec = [[self._weights(c.conv, split=self.feats[i] if j == 0 else None)
                         for j, c in enumerate(level.convs)] for i, level in enumerate(model.decoder)]

    def _weights(self, conv, split: int | None = None):
        w = conv.weight.detach()
        up = None
        if split is not None:
            w, up = w[:, :split], upsampling_conv_weights(w[:, split:]).contiguous(memory_format=self.layout)
        return w.contiguous(memory_format=self.layout), conv.bias.detach(), up

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
        """Add to ``y`` (rows [olo, ohi)) the conv of the x2 upsampling of ``low``."""
        taps, first, odd_shift = _parity_offsets(self.halo)
        m, ym, zm = low.shape[2:]
        i0, i1 = olo // 2, (ohi + 1) // 2  # low rows whose children cover [olo, ohi)
        r0, r1 = i0 + first, i1 + first + odd_shift + taps - 1
        part = low[:, :, max(r0, 0): min(r1, m)]
        yz_hi = first + odd_shift + taps - 1
        part = F.pad(part, (-first, yz_hi, -first, yz_hi, max(0, -r0), max(0, r1 - m)))
        z = F.conv3d(part, w_up)
        cout = y.shape[1]
        for k, (px, py, pz) in enumerate(product((0, 1), repeat=3)):
            t0 = (px - olo) % 2  # first row of y with parity px
            count = len(range(t0, ohi - olo, 2))
            if count == 0:
                continue
            i_first = (olo + t0 - px) // 2
            sx = i_first - i0 + (odd_shift if px else 0)
            sy, sz = (odd_shift if py else 0), (odd_shift if pz else 0)
            y[:, :, t0::2, py::2, pz::2] += z[:, k * cout:(k + 1) * cout, sx:sx + count, sy:sy + ym, sz:sz + zm]

    @staticmethod
    def _slabs(t: torch.Tensor, rows: int) -> Rows:
        for a in range(0, t.shape[2], rows):
            yield t[:, :, a:a + rows]

    @staticmethod
    def _stream(slabs: Rows, n: int, halo: int,
                step: Callable[[torch.Tensor, int, int], torch.Tensor]) -> Rows:
        """Apply a 'same' operator of half-width ``halo`` along the rows of a stream.

        ``step(window, olo, ohi)`` gives output rows [olo, ohi) from the input rows
        [olo - halo, ohi + halo), zero rows standing in beyond the volume's borders. Each
        slab is joined to the ``2 * halo`` rows kept from the one before, so no row is
        computed twice.
        """
        buf, buf_lo, have, done = None, 0, 0, 0
        for slab in slabs:
            have += slab.shape[2]
            buf = slab if buf is None else torch.cat([buf, slab], 2)
            del slab  # hold no slab longer than needed: memory is the point of streaming
            end = n if have == n else have - halo
            if end <= done:
                continue
            wlo, whi = done - halo, end + halo
            window = buf[:, :, max(wlo, 0) - buf_lo: min(whi, n) - buf_lo]
            if wlo < 0 or whi > n:
                window = F.pad(window, (0, 0, 0, 0, max(0, -wlo), max(0, whi - n)))
            out = [step(window, done, end)]
            del window
            keep = max(end - halo, 0)
            buf = buf[:, :, keep - buf_lo:].clone() if end < n else None
            buf_lo, done = keep, end
            yield out.pop()

    def _rows_for(self, channels: int, cross_section: int) -> int:
        """Slab thickness whose temporaries (``channels`` per row) fit in the budget."""
        rows = self.budget // max(1, channels * cross_section * 4)
        rows = max(MIN_ROWS, int(rows))
        return rows - rows % 2

    def _conv_stream(self, slabs: Rows, n: int, convs, low: torch.Tensor | None = None,
                     then: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Rows:
        """A level's convolutions as a stream; ``then`` is applied to the last one's slabs."""
        for j, weights in enumerate(convs):
            up = low if j == 0 else None
            last = then if j == len(convs) - 1 else None

            def step(win, lo, hi, weights=weights, up=up, last=last):
                y = self._conv(weights, win, lo, hi, up)
                return last(y) if last else y

            slabs = self._stream(slabs, n, self.halo, step)
        return slabs

    # -- one pass --------------------------------------------------------------------
    def _pass(self, x: torch.Tensor, emit: Callable[[int, int, torch.Tensor], None],
              sigma: float | None, progress: ProgressFn | None) -> None:
        """Run the network on ``x`` (1, 1, X, Y, Z); emit(a, b, posteriors[a:b]) per slab."""
        model, feats = self.model, self.feats
        levels = len(model.encoder)
        shape = x.shape[2:]
        size = [[s // 2**i for s in shape] for i in range(levels)]
        cross = [s[1] * s[2] for s in size]
        # progress in proportion to each stage's multiply-adds
        work = [8.0**-i * feats[i] ** 2 for i in range(levels)]
        total = 2 * sum(work[:-1]) + work[-1] + work[0]
        state = {"done": 0.0}

        def advance(amount: float) -> None:
            state["done"] += amount
            if progress:
                progress(min(1.0, state["done"] / total))

        def empty(channels: int, level: int) -> torch.Tensor:
            return torch.empty((1, channels, *size[level]), dtype=x.dtype, device=x.device
                               ).contiguous(memory_format=self.layout)

        skips: list[torch.Tensor | None] = [None] * levels
        inp = x.contiguous(memory_format=self.layout)
        for i in range(levels - 1):  # encoder; the top level's skip is not kept
            level, n = model.encoder[i], size[i][0]
            rows = self._rows_for(4 * feats[i], cross[i])
            skip = empty(feats[i], i) if i > 0 else None
            pooled = empty(feats[i], i + 1)
            pos, carry = 0, None
            for f in self._conv_stream(self._slabs(inp, rows), n, self.enc[i]):
                r0, pos = pos, pos + f.shape[2]
                if skip is not None:
                    skip[:, :, r0:pos] = f
                g = level.bn(f)
                del f
                if carry is not None:
                    g, r0 = torch.cat([carry, g], 2), r0 - 1
                carry = g[:, :, -1:].clone() if g.shape[2] % 2 else None
                g = g[:, :, : g.shape[2] - g.shape[2] % 2]
                pooled[:, :, r0 // 2: r0 // 2 + g.shape[2] // 2] = F.max_pool3d(g, 2)
                advance(work[i] * (g.shape[2] + (carry is not None)) / n)
                del g
            skips[i], inp = skip, pooled
        bottom = model.encoder[levels - 1]
        low = bottom.bn(bottom.features(inp))
        advance(work[-1])
        del inp
        for i in range(levels - 2, 0, -1):  # decoder below the top: output replaces the skip
            level, n, skip = model.decoder[i], size[i][0], skips[i]
            rows = self._rows_for(6 * feats[i], cross[i])
            pos = 0
            # rows of `skip` are read (and copied) by the stream before they are overwritten
            for f in self._conv_stream(self._slabs(skip, rows), n, self.dec[i], low):
                skip[:, :, pos:pos + f.shape[2]] = level.bn(f)
                pos += f.shape[2]
                advance(work[i] * f.shape[2] / n)
                del f
            skips[i], low = None, skip
        # top level: recompute the level-0 skip, decode, head, softmax, smoothing
        dec0, n = model.decoder[0], size[0][0]
        n_out = model.config.out_channels
        rows = self._rows_for(max(6 * feats[0], 4 * n_out), cross[0])
        top = x.contiguous(memory_format=self.layout)
        stream = self._conv_stream(self._slabs(top, rows), n, self.enc[0])
        stream = self._conv_stream(stream, n, self.dec[0], low,
                                   then=lambda f: torch.softmax(model.head(dec0.bn(f)), dim=1))
        if sigma:
            kernel = gaussian_kernel_3d(sigma).to(x.device, x.dtype)
            h = kernel.shape[0] // 2
            w = kernel[None, None].expand(n_out, 1, *kernel.shape).contiguous(memory_format=self.layout)

            stream = self._stream(stream, n, h,
                                  lambda win, lo, hi: F.conv3d(win, w, groups=n_out, padding=(0, h, h)))
        pos = 0
        for p in stream:
            emit(pos, pos + p.shape[2], p)
            pos += p.shape[2]
            advance(2 * work[0] * p.shape[2] / n)
            del p

    @torch.no_grad()
    def posteriors(self, volume: torch.Tensor, sigma: float | None = 0.5,
                   flip_indices: np.ndarray | None = None, progress: ProgressFn | None = None
                   ) -> torch.Tensor:
        """Smoothed posteriors (C, X, Y, Z) of a padded volume (X, Y, Z), flip-averaged if asked."""
        x = volume[None, None]
        n_out = self.model.config.out_channels
        # allocated at the first emitted slab, once the lower levels' buffers are freed
        out = None
        n = volume.shape[0]
        passes = 2 if flip_indices is not None else 1

        def stage_progress(k):
            return (lambda f: progress((k + f) / passes)) if progress else None

        def write_direct(a, b, p):
            nonlocal out
            if out is None:
                out = torch.empty((n_out, *volume.shape), dtype=volume.dtype, device=volume.device)
            out[:, a:b] = p[0]

        self._pass(x, write_direct, sigma, stage_progress(0))
        if flip_indices is not None:
            idx = torch.as_tensor(np.asarray(flip_indices), device=volume.device)

            def add_flipped(a, b, p):
                out[:, n - b: n - a] += p[0].flip(1)[idx]

            self._pass(x.flip(2), add_flipped, sigma, stage_progress(1))
            out *= 0.5
        return out
