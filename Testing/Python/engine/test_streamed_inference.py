"""The streamed, slab-wise network equals a plain whole-volume evaluation of SynthSeg's wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_unet
from torch.nn import functional as F

from SynthSegMONAILib.inference import BuiltInput, SlabNetwork, gaussian_kernel_3d, upsampling_deconv_weights
from SynthSegMONAILib.network import SynthSegUNet, UNetConfig
from SynthSegMONAILib.synthseg2_networks import DenoiserUNet


def _reference(model: SynthSegUNet, volume: torch.Tensor, sigma: float | None, flip: np.ndarray | None
               ) -> torch.Tensor:
    """SynthSeg's wrapper computed the obvious way, on the whole volume at once."""
    n_out = model.config.out_channels

    def one(x):
        p = torch.softmax(model(x[None, None]), 1)
        if sigma:
            k = gaussian_kernel_3d(sigma)
            p = F.conv3d(p, k[None, None].expand(n_out, 1, *k.shape), groups=n_out, padding=k.shape[0] // 2)
        return p[0]

    with torch.no_grad():
        p = one(volume)
        if flip is not None:
            p = 0.5 * (p + one(volume.flip(0)).flip(1)[torch.as_tensor(flip)])
    return p


@pytest.mark.parametrize("kernel", [3, 5])
def test_upsampling_conv_weights_reproduce_conv_of_upsampled_volume(kernel):
    torch.manual_seed(1)
    low = torch.randn(1, 4, 5, 6, 7)
    weight = torch.randn(3, 4, kernel, kernel, kernel)
    expected = F.conv3d(F.interpolate(low, scale_factor=2, mode="nearest"), weight, padding=kernel // 2)
    model = random_unet(UNetConfig(levels=2, features=4, out_channels=3, kernel_size=kernel))
    net = SlabNetwork(model)
    w_up = upsampling_deconv_weights(weight).contiguous(memory_format=net.layout)
    assert w_up.shape == (4, 3, kernel + 1, kernel + 1, kernel + 1)
    # every output row range, odd starts and ends included
    for lo, hi in [(0, 10), (1, 10), (3, 8), (0, 1), (9, 10), (4, 7)]:
        y = torch.zeros(1, 3, hi - lo, 12, 14)
        net._add_upsampled_conv(y, low, w_up, lo, hi)
        assert torch.allclose(y, expected[:, :, lo:hi], atol=1e-4), (lo, hi)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("cfg,shape", [
    (UNetConfig(levels=3, features=4, out_channels=5), (24, 16, 20)),
    (UNetConfig(levels=3, features=3, out_channels=4, kernel_size=5, convs_per_level=3), (20, 12, 16)),
    (UNetConfig(levels=4, features=4, out_channels=6, convs_per_level=1), (40, 24, 16)),
    (UNetConfig(levels=2, features=6, out_channels=3), (14, 8, 10)),  # skip0 cannot be kept in the output
])
def test_streamed_slabs_equal_whole_volume(cfg, shape, channels_last):
    model = random_unet(cfg)
    torch.manual_seed(2)
    volume = torch.randn(*shape)
    flip = np.r_[0, np.roll(np.arange(1, cfg.out_channels), 1)]  # any permutation keeping background
    for sigma, flip_indices in [(None, None), (0.5, flip)]:
        expected = _reference(model, volume, sigma, flip_indices)
        # budgets from the thinnest slabs to the whole volume in one slab
        for budget_mb in (0, 1, 64):
            net = SlabNetwork(model, slab_budget_mb=budget_mb, channels_last=channels_last)
            got = net.posteriors(volume, sigma=sigma, flip_indices=flip_indices)
            assert got.shape == (cfg.out_channels, *shape)
            assert torch.allclose(got, expected, atol=2e-5), (sigma, budget_mb)


def test_progress_rises_to_one():
    model = random_unet(UNetConfig(levels=3, features=4, out_channels=5))
    seen = []
    SlabNetwork(model, slab_budget_mb=0).posteriors(torch.randn(16, 16, 16), flip_indices=np.arange(5),
                                                    progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(1.0)
    assert len(seen) > 10


def test_built_input_streams_the_same_values_as_the_stored_input():
    model = random_unet(UNetConfig(in_channels=2, levels=3, features=4, out_channels=5))
    torch.manual_seed(3)
    x = torch.randn(1, 2, 24, 16, 20)
    built = BuiltInput(2, x.shape[2:], lambda a, b: x[:, :, a:b].clone())

    def run(inp):
        out = []
        SlabNetwork(model, slab_budget_mb=0)._pass(inp, False, lambda a, b, p: out.append(p.clone()), None)
        return torch.cat(out, 2)

    with torch.no_grad():
        assert torch.equal(run(built), run(x))
    with pytest.raises(ValueError, match="flip"):
        next(SlabNetwork(model)._input_slabs(built, 4, True))


def _one_pass_after_the_other(net: SlabNetwork, volume: torch.Tensor, flip: np.ndarray) -> torch.Tensor:
    """Flip averaging the plain way: the whole first pass, then the whole flipped pass, averaged."""
    x, passes = volume[None, None], []
    for flipped, channels in ((False, None), (True, torch.as_tensor(flip))):
        rows: list[torch.Tensor] = []
        net._pass(x, flipped, lambda a, b, p, rows=rows: rows.append(p.clone()), None, channels=channels)
        passes.append(torch.cat(rows, 2)[0])
    return (passes[0] + passes[1].flip(1)) * 0.5


@pytest.mark.parametrize("model,shape,kept", [
    (random_unet(UNetConfig(levels=3, features=4, out_channels=5), seed=5), (40, 16, 20), True),
    (random_unet(UNetConfig(levels=4, features=4, out_channels=6, convs_per_level=1), seed=6), (48, 16, 16), True),
    (random_unet(UNetConfig(levels=3, features=3, out_channels=4, kernel_size=5, convs_per_level=3), seed=7),
     (36, 12, 16), True),
    (random_unet(UNetConfig(levels=2, features=6, out_channels=3), seed=8), (22, 8, 10), False),  # does not fit
    (DenoiserUNet(UNetConfig(levels=3, features=4, out_channels=5), skip_n_concatenations=2), (32, 16, 12),
     False),  # no top skip connection
])
def test_flip_passes_side_by_side_give_the_same_bits_as_one_after_the_other(model, shape, kept):
    """The flip-averaged run (lower levels of both passes, then both top levels side by side, the
    flipped one from its last row back, part of the first's top skip connection kept) computes every
    row as the plain order does."""
    torch.manual_seed(9)
    model.eval()
    volume = torch.randn(*shape)
    flip = np.r_[0, np.roll(np.arange(1, model.config.out_channels), 1)]
    for budget_mb in (0, 1, 64):
        net = SlabNetwork(model, slab_budget_mb=budget_mb)
        assert net.flip_side_by_side  # float32 posteriors
        expected = _one_pass_after_the_other(net, volume, flip)
        assert torch.equal(net.posteriors(volume, sigma=None, flip_indices=flip), expected), budget_mb
        net.flip_side_by_side = False  # as with 16-bit posteriors
        assert torch.equal(net.posteriors(volume, sigma=None, flip_indices=flip), expected), budget_mb
    rows = SlabNetwork(model)._stored_top_rows(torch.empty(shape[0], 1, 1, model.config.out_channels))
    assert (0 < rows < shape[0]) == kept
