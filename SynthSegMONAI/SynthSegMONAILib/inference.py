"""Memory-lean, exact evaluation of SynthSeg's network wrapper.

SynthSeg's wrapper (``predict_synthseg.py::build_model``) is: U-Net, softmax, a 3x3x3
Gaussian blur of the posteriors (zero padded), and, unless ``--fast``, the same on the
left-right flipped input, flipped back with left/right channels swapped, averaged 50/50.

Running the U-Net on a whole 256^3 volume at once needs many GB (each top-level
activation is 1.6 GB). Here every level is computed in slabs along the first axis with
just enough overlap ("halo") for its convolutions, zero padding applied only at the
volume's own borders: the result is the same as a whole-volume pass, but only the
posteriors, the stored skip connections of the lower levels and one slab's temporaries
are ever in memory. The top level's skip connection is recomputed slab by slab instead
of being stored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .network import SynthSegUNet, UNetLevel

ProgressFn = Callable[[float], None]


def gaussian_kernel_3d(sigma: float) -> torch.Tensor:
    """SynthSeg's posterior-smoothing kernel: full 3D Gaussian normalised to sum 1."""
    window = int(np.ceil(2.5 * sigma) / 2) * 2 + 1
    r = np.arange(window) - window // 2
    g = np.exp(-(r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) / (2 * sigma**2))
    return torch.from_numpy((g / g.sum()).astype(np.float32))


MIN_SLAB = 8  # thinner slabs spend more time recomputing their overlap than they save


def _even_slab(budget_bytes: int, channels: int, cross_section: int, halo: int, n: int) -> int:
    """Even slab thickness whose temporaries (``channels`` per row, overlap included) fit
    in ``budget_bytes``, but at least MIN_SLAB rows."""
    rows = budget_bytes // max(1, channels * cross_section * 4) - 2 * halo
    rows = max(MIN_SLAB, min(n, int(rows)))
    return max(2, rows - rows % 2)


class SlabNetwork:
    """Evaluates a :class:`SynthSegUNet` slab by slab; see the module docstring."""

    def __init__(self, model: SynthSegUNet, slab_budget_mb: int = 512):
        self.model = model.eval()
        self.budget = slab_budget_mb * 2**20
        cfg = model.config
        self.halo = cfg.kernel_size // 2
        self.n_convs = cfg.convs_per_level

    # -- building blocks -------------------------------------------------------------
    def _conv(self, block, parts: list[torch.Tensor], lo: int, hi: int, n: int
              ) -> tuple[torch.Tensor, int, int]:
        """One 'same' conv + ELU on rows [lo, hi) of an axis of length n.

        ``parts`` together are the conv's input channels: each is convolved with its slice
        of the weights and the results summed, so no concatenated copy is ever made.
        Zero padding along the slab axis is added only at the volume's own borders.
        """
        h = self.halo
        pad_lo = h if lo == 0 else 0
        pad_hi = h if hi == n else 0
        weight, y, c0 = block.conv.weight, None, 0
        for part in parts:
            c1 = c0 + part.shape[1]
            if pad_lo or pad_hi:
                part = F.pad(part, (0, 0, 0, 0, pad_lo, pad_hi))
            out = F.conv3d(part, weight[:, c0:c1], None, padding=(0, h, h))
            y = out if y is None else y.add_(out)
            c0 = c1
        y.add_(block.conv.bias.view(1, -1, 1, 1, 1))
        return F.elu(y, inplace=True), lo + h - pad_lo, hi - h + pad_hi

    def _features(self, level: UNetLevel, get_input, a: int, b: int, n: int) -> torch.Tensor:
        """The level's conv stack output (its skip connection) on rows [a, b)."""
        reach = self.n_convs * self.halo
        lo, hi = max(a - reach, 0), min(b + reach, n)
        parts = get_input(lo, hi)
        for block in level.convs:
            x, lo, hi = self._conv(block, parts, lo, hi, n)
            parts = [x]
        return x[:, :, a - lo: b - lo]

    @staticmethod
    def _upsampled(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the x2 nearest-neighbour upsampling of ``t``."""
        src = t[:, :, lo // 2: (hi + 1) // 2]
        up = F.interpolate(src, scale_factor=2, mode="nearest")
        off = lo - 2 * (lo // 2)
        return up[:, :, off: off + hi - lo]

    # -- one pass --------------------------------------------------------------------
    def _pass(self, x: torch.Tensor, emit: Callable[[int, int, torch.Tensor], None],
              sigma: float | None, progress: ProgressFn | None) -> None:
        """Run the network on ``x`` (1, 1, X, Y, Z); emit(a, b, posteriors[a:b]) per slab."""
        model = self.model
        levels = len(model.encoder)
        feats = model.config.level_features()
        sizes = [x.shape[2] // 2**i for i in range(levels)]
        cross = [x.shape[3] * x.shape[4] // 4**i for i in range(levels)]
        total_work = 2 * levels - 1
        done = 0

        def tick():
            nonlocal done
            done += 1
            if progress:
                progress(done / total_work)

        skips: list[torch.Tensor | None] = [None] * levels
        inp: torch.Tensor = x
        # encoder: levels 0 .. levels-2 in slabs; the skip of level 0 is not kept
        for i in range(levels - 1):
            level, n = model.encoder[i], sizes[i]
            widest = inp.shape[1] + 2 * feats[i]
            s = _even_slab(self.budget, widest, cross[i], self.n_convs * self.halo, n)
            pooled_parts = []
            skip = torch.empty((1, feats[i], *inp.shape[2:]), dtype=x.dtype, device=x.device) if i > 0 else None
            src = inp
            for a in range(0, n, s):
                b = min(a + s, n)
                f = self._features(level, lambda lo, hi, src=src: [src[:, :, lo:hi]], a, b, n)
                if skip is not None:
                    skip[:, :, a:b] = f
                pooled_parts.append(F.max_pool3d(level.bn(f), 2))
            skips[i] = skip
            inp = torch.cat(pooled_parts, dim=2)
            del pooled_parts
            tick()
        # bottleneck and the decoder levels that are small enough to run whole
        level = model.encoder[levels - 1]
        dec = level.bn(level.features(inp))
        tick()
        del inp
        for i in range(levels - 2, 0, -1):
            level, n = model.decoder[i], sizes[i]
            s = _even_slab(self.budget, 3 * feats[i] + feats[i + 1], cross[i], self.n_convs * self.halo, n)
            out = torch.empty((1, feats[i], *skips[i].shape[2:]), dtype=x.dtype, device=x.device)
            skip, low = skips[i], dec

            def get_input(lo, hi, skip=skip, low=low):
                return [skip[:, :, lo:hi], self._upsampled(low, lo, hi)]

            for a in range(0, n, s):
                b = min(a + s, n)
                out[:, :, a:b] = level.bn(self._features(level, get_input, a, b, n))
            skips[i] = None
            dec = out
            del skip, low
            tick()
        # top level: recompute the level-0 skip, decode, head, softmax, smoothing
        enc0, dec0, n = model.encoder[0], model.decoder[0], sizes[0]
        smooth_halo = 0
        kernel = None
        if sigma:
            kernel = gaussian_kernel_3d(sigma).to(x.device, x.dtype)
            smooth_halo = kernel.shape[0] // 2
        n_out = model.config.out_channels
        widest = max(3 * feats[0] + feats[1], 2 * n_out)
        halo = smooth_halo + 2 * self.n_convs * self.halo
        s = _even_slab(self.budget, widest, cross[0], halo, n)

        def enc0_input(lo, hi):
            return [x[:, :, lo:hi]]

        def dec0_input(lo, hi, low=dec):
            return [self._features(enc0, enc0_input, lo, hi, n), self._upsampled(low, lo, hi)]

        for a in range(0, n, s):
            b = min(a + s, n)
            lo, hi = max(a - smooth_halo, 0), min(b + smooth_halo, n)
            f = dec0.bn(self._features(dec0, dec0_input, lo, hi, n))
            p = torch.softmax(model.head(f), dim=1)
            del f
            if kernel is not None:
                h = smooth_halo
                pad_lo = h if lo == 0 else 0
                pad_hi = h if hi == n else 0
                if pad_lo or pad_hi:
                    p = F.pad(p, (0, 0, 0, 0, pad_lo, pad_hi))
                w = kernel[None, None].expand(n_out, 1, *kernel.shape)
                p = F.conv3d(p, w, groups=n_out, padding=(0, h, h))
                lo = lo + h - pad_lo
            emit(a, b, p[:, :, a - lo: b - lo])
            if progress:
                progress((done + (b / n)) / total_work)

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
