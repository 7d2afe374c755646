"""SynthSeg's generative model (1.0 training settings), run on the training device.

One sample is a pure function of (label map, seed): every random parameter is drawn in
:meth:`Synthesizer.draw_parameters` from a seeded generator, and the random fields (velocity
field, GMM noise, bias field) come from a generator on the device seeded from it. Steps, in
SynthSeg's order:

1. spatial: affine (scaling, rotation, shearing, translation) and an elastic deformation (a
   stationary velocity field of ``nonlin_shape``^3 control points integrated by scaling and
   squaring), evaluated *only on the output crop's grid* and applied to the label map with
   nearest-neighbour sampling; random crop position;
2. left/right flip along the RAS x axis, swapping left and right labels;
3. Gaussian mixture intensities per GMM class (48 classes), background rules;
4. multiplicative bias field (exponentiated smooth Gaussian field);
5. clip, rescale to [0, 1], gamma;
6. resolution: slice-thickness blur, downsampling to a random resolution and linear
   upsampling back; optional noise; final rescale to [0, 1];
7. targets: generation labels mapped to the output channels as SynthSeg maps them.

Cornucopia (``cornucopia``) does the blur (``SmoothTransform``), the gamma
(``GammaFinalTransform``) and the noise (``GaussianNoiseTransform``). The deformation, the
Gaussian mixture and the bias field are plain PyTorch: Cornucopia's affine+elastic transform
deforms the whole map (about 0.24 s for a 64^3 map on 2 CPU cores, growing with the map,
versus only the crop's grid here), its velocity-field parameterisation is not SynthSeg's,
and its elastic transform failed on CUDA tensors in a measured run; its
``GaussianMixtureFinalTransform`` loops over classes with boolean masks (33 ms against
2 ms for one gather at 64^3); its bias field draws uniform control values rather than
SynthSeg's exponentiated Gaussian field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cornucopia as cc
import numpy as np
import torch
from torch.nn import functional as F

from .config import SynthesisConfig
from .label_maps import GenerationTable, LabelMap

FWHM_PER_SIGMA = math.sqrt(8 * math.log(2))


def sample_seed(*keys: int) -> int:
    """A 63-bit seed derived from integers (base seed, rank, step, index...)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


@dataclass
class SampleParameters:
    """Every random choice of one sample."""

    map_index: int
    crop_offset: list[int]
    affine: torch.Tensor  #: (3, 3) linear part, output -> source
    translation: torch.Tensor  #: (3,) voxels
    svf_std: float
    flip: bool
    means: torch.Tensor  #: (K,) per GMM class
    stds: torch.Tensor  #: (K,)
    bias_std: float  #: 0 when no bias field
    gamma: float
    resolution_mm: list[float]
    thickness_mm: list[float]
    blur_sigma_vox: list[float]
    noise_std: float
    field_seed: int


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int | None = None):
    u = torch.rand(n or 1, generator=gen, dtype=torch.float64)
    v = lo + (hi - lo) * u
    return v.float() if n else float(v)


def affine_matrix(scales: torch.Tensor, angles_deg: torch.Tensor, shears: torch.Tensor) -> torch.Tensor:
    """Rotation x shearing x scaling, as a 3x3 matrix."""
    a = torch.deg2rad(angles_deg.double())
    c, s = torch.cos(a), torch.sin(a)
    rx = torch.tensor([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]], dtype=torch.float64)
    ry = torch.tensor([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]], dtype=torch.float64)
    rz = torch.tensor([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
    sh = torch.eye(3, dtype=torch.float64)
    sh[0, 1], sh[0, 2], sh[1, 2] = shears.double()
    return (rz @ ry @ rx @ sh @ torch.diag(scales.double())).float()


def _normalised(coords: torch.Tensor, shape) -> torch.Tensor:
    """Map voxel coordinates (..., 3) in a volume of ``shape`` to grid_sample's (x=W, y=H, z=D)."""
    size = torch.tensor([max(s - 1, 1) for s in shape], dtype=coords.dtype, device=coords.device)
    return (2 * coords / size - 1).flip(-1)


def _sample(volume: torch.Tensor, coords: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample (C, X, Y, Z) ``volume`` at voxel coordinates (*out, 3); zeros outside."""
    grid = _normalised(coords, volume.shape[1:])[None]
    return F.grid_sample(volume[None], grid, mode=mode, padding_mode="zeros", align_corners=True)[0]


def integrate_velocity(svf: torch.Tensor, steps: int, shape) -> torch.Tensor:
    """Scaling and squaring of a (3, *grid) velocity field in voxels of a volume of ``shape``.

    The grid spans the whole volume (corner to corner); returns the displacement on it.
    """
    grid_shape = svf.shape[1:]
    axes = [torch.linspace(0, s - 1, g, device=svf.device) for s, g in zip(shape, grid_shape)]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*grid, 3)
    disp = svf / (2 ** steps)
    for _ in range(steps):
        moved = points + disp.movedim(0, -1)
        size = torch.tensor([max(s - 1, 1) for s in shape], dtype=disp.dtype, device=disp.device)
        grid = (2 * moved / size - 1).flip(-1)[None]
        disp = disp + F.grid_sample(disp[None], grid, mode="bilinear", padding_mode="border",
                                    align_corners=True)[0]
    return disp


class Synthesizer:
    """Draws SynthSeg training samples (image, target channels) from cached label maps."""

    def __init__(self, cfg: SynthesisConfig, table: GenerationTable, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.table = table
        self.device = torch.device(device)
        self.classes = torch.as_tensor(table.classes, dtype=torch.long, device=self.device)
        self.lr_swap = torch.as_tensor(table.lr_swap, dtype=torch.long, device=self.device)
        self.channels = torch.as_tensor(table.target_channels(), dtype=torch.long, device=self.device)
        self.n_classes = table.n_classes

    # -- random parameters -------------------------------------------------------------
    def draw_parameters(self, gen: torch.Generator, maps: list[LabelMap], crop_size=None) -> SampleParameters:
        """Draw every random parameter of one sample from ``gen`` (a CPU generator)."""
        c = self.cfg
        crop = list(crop_size or c.crop_size)
        map_index = int(torch.randint(len(maps), (1,), generator=gen))
        map_shape, voxel_size = maps[map_index].indices.shape, maps[map_index].voxel_size
        offset = []
        for s, k in zip(map_shape, crop):
            hi = s - k
            offset.append(int(torch.randint(hi + 1, (1,), generator=gen)) if hi >= 0 else hi // 2)
        scales = 1 + _uniform(gen, -c.scaling_bounds, c.scaling_bounds, 3)
        angles = _uniform(gen, -c.rotation_bounds, c.rotation_bounds, 3)
        shears = _uniform(gen, -c.shearing_bounds, c.shearing_bounds, 3)
        translation = _uniform(gen, -c.translation_bounds, c.translation_bounds, 3)
        svf_std = _uniform(gen, 0, c.nonlin_std)
        flip = _uniform(gen, 0, 1) < c.flip_probability
        means = _uniform(gen, *c.mean_range, self.n_classes)
        stds = _uniform(gen, *c.std_range, self.n_classes)
        u = _uniform(gen, 0, 1)
        if u < c.background_zero_probability:
            means[0], stds[0] = 0.0, 0.0
        elif u < c.background_zero_probability + c.background_dark_probability:
            means[0] = _uniform(gen, 0, c.background_dark_mean_max)
            stds[0] = _uniform(gen, 0, c.background_dark_std_max)
        bias_std = _uniform(gen, 0, c.bias_field_std) if _uniform(gen, 0, 1) < c.bias_field_probability else 0.0
        gamma = math.exp(c.gamma_std * float(torch.randn(1, generator=gen, dtype=torch.float64)))
        native = [float(v) for v in voxel_size]
        u = _uniform(gen, 0, 1)
        if u < c.native_resolution_probability:
            resolution = list(native)
        elif u < c.native_resolution_probability + c.isotropic_resolution_probability:
            r = _uniform(gen, *c.isotropic_resolution_range)
            resolution = [max(r, n) for n in native]
        else:
            axis = int(torch.randint(3, (1,), generator=gen))
            resolution = list(native)
            resolution[axis] = max(_uniform(gen, *c.anisotropic_resolution_range), native[axis])
        thickness, sigma = [], []
        for r, n in zip(resolution, native):
            t = _uniform(gen, n, r) if r > n else n
            jitter = _uniform(gen, 1 - c.blur_jitter, 1 + c.blur_jitter)
            thickness.append(t)
            sigma.append(c.blur_factor * t / n * jitter if r > n else 0.0)
        noise_std = _uniform(gen, 0, c.noise_std_max) if c.noise_std_max > 0 else 0.0
        field_seed = int(torch.randint(2**62, (1,), generator=gen))
        return SampleParameters(map_index, offset, affine_matrix(scales, angles, shears), translation,
                                svf_std, flip, means, stds, bias_std, gamma, resolution, thickness,
                                sigma, noise_std, field_seed)

    # -- steps -------------------------------------------------------------------------
    def deform(self, indices: torch.Tensor, p: SampleParameters, crop, dgen: torch.Generator) -> torch.Tensor:
        """Affine + elastic deformation and crop of a (X, Y, Z) index map (nearest neighbour)."""
        c = self.cfg
        shape = list(indices.shape)
        dev = self.device
        axes = [torch.arange(o, o + k, device=dev, dtype=torch.float32) for o, k in zip(p.crop_offset, crop)]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*crop, 3)
        centre = torch.tensor([(s - 1) / 2 for s in shape], device=dev)
        src = (points - centre) @ p.affine.to(dev).T + centre + p.translation.to(dev)
        if p.svf_std > 0 and c.nonlin_std > 0:
            n = c.nonlin_shape
            svf = torch.randn((3, n, n, n), generator=dgen, device=dev) * p.svf_std
            grid = [max(n, math.ceil(s / 4)) for s in shape]
            svf = F.interpolate(svf[None], size=grid, mode="trilinear", align_corners=True)[0]
            disp = integrate_velocity(svf, c.integration_steps, shape)
            src = src + _sample(disp, points, "bilinear").movedim(0, -1)
        out = _sample(indices[None].float(), src, "nearest")[0]
        return out.round().long()

    def flip(self, indices: torch.Tensor) -> torch.Tensor:
        """Flip left-right (RAS x axis) and swap left/right generation labels."""
        return self.lr_swap[indices.flip(0)]

    def intensities(self, indices: torch.Tensor, p: SampleParameters, dgen: torch.Generator) -> torch.Tensor:
        """Gaussian mixture: one mean and std per GMM class."""
        cls = self.classes[indices]
        means, stds = p.means.to(self.device), p.stds.to(self.device)
        noise = torch.randn(indices.shape, generator=dgen, device=self.device)
        return means[cls] + stds[cls] * noise

    def bias_field(self, image: torch.Tensor, p: SampleParameters, dgen: torch.Generator) -> torch.Tensor:
        """Multiply by exp of a smooth Gaussian field."""
        if p.bias_std <= 0:
            return image
        n = self.cfg.bias_field_shape
        small = torch.randn((1, 1, n, n, n), generator=dgen, device=self.device) * p.bias_std
        field = F.interpolate(small, size=image.shape, mode="trilinear", align_corners=True)[0, 0]
        return image * field.exp()

    @staticmethod
    def rescale(image: torch.Tensor) -> torch.Tensor:
        """Min-max to [0, 1]."""
        lo, hi = image.min(), image.max()
        return (image - lo) / (hi - lo).clamp_min(1e-6)

    def resolution(self, image: torch.Tensor, p: SampleParameters, voxel_size) -> torch.Tensor:
        """Slice-thickness blur, downsampling to ``p.resolution_mm`` and linear upsampling back."""
        factors = [r / n for r, n in zip(p.resolution_mm, voxel_size)]
        if all(f <= 1 for f in factors):
            return image
        fwhm = [s * FWHM_PER_SIGMA for s in p.blur_sigma_vox]
        x = cc.SmoothTransform(fwhm=fwhm)(image[None])
        shape = list(image.shape)
        low = [max(1, round(s / f)) for s, f in zip(shape, factors)]
        x = F.interpolate(x[None], size=low, mode="trilinear", align_corners=True)
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=True)
        return x[0, 0]

    # -- whole sample ------------------------------------------------------------------
    def sample(self, maps: list[LabelMap], seed: int, crop_size=None, params: SampleParameters | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, SampleParameters]:
        """One sample: image (1, *crop) in [0, 1], target channels (1, *crop) int64, parameters."""
        crop = list(crop_size or self.cfg.crop_size)
        gen = torch.Generator().manual_seed(int(seed))
        if params is None:
            params = self.draw_parameters(gen, maps, crop)
        lm = maps[params.map_index]
        dgen = torch.Generator(device=self.device).manual_seed(params.field_seed)
        idx = self.deform(lm.indices.to(self.device), params, crop, dgen)
        if params.flip:
            idx = self.flip(idx)
        image = self.intensities(idx, params, dgen)
        image = self.bias_field(image, params, dgen)
        image = self.rescale(image.clamp(*self.cfg.clip_range))
        image = cc.GammaFinalTransform(params.gamma, 0.0, 1.0)(image[None])[0]
        image = self.resolution(image, params, lm.voxel_size)
        if params.noise_std > 0:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(params.field_seed + 1)
                image = cc.GaussianNoiseTransform(params.noise_std)(image[None])[0]
        image = self.rescale(image.clamp_min(0))
        return image[None].float(), self.channels[idx][None], params

    def batch(self, maps: list[LabelMap], seeds: list[int], crop_size=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack samples: images (B, 1, *crop) and target channels (B, 1, *crop)."""
        out = [self.sample(maps, s, crop_size)[:2] for s in seeds]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
