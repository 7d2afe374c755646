"""SynthSeg 2.0's label denoiser and QC network, streamed in slabs, equal their whole-volume passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from SynthSegMONAILib.inference import MIN_ROWS, SlabEncoder, SlabNetwork
from SynthSegMONAILib.network import UNetConfig
from SynthSegMONAILib.synthseg2_networks import (
    DENOISER_GROUPS,
    QC_NAMES,
    DenoiserUNet,
    QualityControlNet,
    RobustSegmenter,
    one_hot_argmax,
    qc_input,
)
from SynthSegMONAILib.synthseg2_pipeline import (
    SynthSeg2Segmenter,
    one_hot_input,
    qc_scores_of,
    streamed_argmax,
    streamed_softmax,
)

# slab budgets in MB: 0 gives MIN_ROWS-row slabs everywhere (many thin slabs), 1 a few, 256 one
BUDGETS = [0, 1, 256]


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                for t, lo, hi in ((m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 1.5),
                                  (m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2)):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model.eval()


def _calibrate_head(net: torch.nn.Module, x: torch.Tensor) -> None:
    """Shift the head's biases so that each class wins somewhere on ``x`` (random weights
    otherwise give one class everywhere, and an argmax comparison that tests nothing)."""
    with torch.no_grad():
        net.head.bias.sub_(net(x).flatten(2).median(2).values[0])


def _denoiser(levels: int, features: int = 4, seed: int = 0) -> DenoiserUNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=DENOISER_GROUPS, out_channels=DENOISER_GROUPS, features=features,
                     kernel_size=5, levels=levels)
    return _randomise_batchnorm(DenoiserUNet(cfg, skip_n_concatenations=2), seed)


def _streamed_softmax_of(net: SlabNetwork, x) -> torch.Tensor:
    out = torch.empty((*x.shape[2:], net.model.config.out_channels))

    def emit(a, b, p):
        out[a:b] = p[0].permute(1, 2, 3, 0)

    with torch.no_grad():
        net._pass(x, False, emit, None)
    return out.permute(3, 0, 1, 2)


# odd and even row counts at the lowest levels (40 rows: 5 at level 3 of 4; 48: 3 at level 4 of 5)
@pytest.mark.parametrize("levels,shape", [(4, (32, 24, 16)), (4, (40, 16, 24)), (5, (48, 32, 16)),
                                          (5, (64, 16, 32))])
@pytest.mark.parametrize("budget", BUDGETS)
def test_streamed_denoiser_equals_whole_volume(levels, shape, budget):
    model = _denoiser(levels, seed=levels)
    index = torch.randint(0, DENOISER_GROUPS, shape, generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    x = F.one_hot(index.long(), DENOISER_GROUPS).movedim(-1, 0)[None].float()
    _calibrate_head(model, x)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1)[0]
    assert len(expected.argmax(0).unique()) == DENOISER_GROUPS
    net = SlabNetwork(model, slab_budget_mb=budget)
    assert net.skipless == 2
    built = one_hot_input(index, DENOISER_GROUPS)
    got = _streamed_softmax_of(net, built)
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(streamed_argmax(net, built), expected.argmax(0).to(torch.uint8))
    # the tensor input gives the same as the built one
    assert torch.equal(_streamed_softmax_of(net, x), got)


def test_thin_slabs_are_thin():
    net = SlabNetwork(_denoiser(4), slab_budget_mb=0)
    assert net._rows_for(64, 64 * 64) == MIN_ROWS


def test_one_hot_input_rows_build_the_whole_input():
    index = torch.randint(0, 5, (6, 4, 3), dtype=torch.uint8)
    image = torch.randn(6, 4, 3)
    built = one_hot_input(index, 5, image)
    assert built.shape == (1, 6, 6, 4, 3)
    whole = torch.cat([image[None, None], F.one_hot(index.long(), 5).movedim(-1, 0)[None].float()], 1)
    assert torch.equal(torch.cat([built.rows(0, 4), built.rows(4, 6)], 2), whole)


def _qc_net(features: int, seed: int = 0) -> QualityControlNet:
    torch.manual_seed(seed)
    return _randomise_batchnorm(QualityControlNet(features=features), seed)


@pytest.mark.parametrize("shape", [(64, 64, 64), (45, 30, 37)])
@pytest.mark.parametrize("budget", BUDGETS)
def test_streamed_qc_equals_whole_volume(shape, budget):
    net = _qc_net(8)
    groups = torch.randint(0, len(QC_NAMES), shape, generator=torch.Generator().manual_seed(2))
    x = F.one_hot(groups, len(QC_NAMES)).movedim(-1, 0)[None].float()
    with torch.no_grad():
        expected = net(x)
    got = SlabEncoder(net, slab_budget_mb=budget).scores(one_hot_input(groups.to(torch.uint8), len(QC_NAMES)))
    assert got.shape == expected.shape and (expected != 0).sum() > 1
    assert (got - expected).abs().max() < 1e-5 * max(1.0, expected.abs().max().item())


def test_qc_scores_of_a_label_map_equal_the_whole_volume_qc():
    """The pipeline's QC (crop, groups, one-hot built by slabs, streamed network) on an argmax map
    equals :func:`qc_input` and the network's ``forward``, at SynthSeg's feature count."""
    net = _qc_net(24, seed=3)
    labels = list(range(33))
    gen = torch.Generator().manual_seed(4)
    index = torch.zeros((40, 44, 36), dtype=torch.uint8)
    index[6:34, 5:40, 4:30] = torch.randint(0, 33, (28, 35, 26), generator=gen).to(torch.uint8)
    posteriors = F.one_hot(index.long(), 33).movedim(-1, 0).float()
    with torch.no_grad():
        expected = net(qc_input(posteriors, labels, target=32))[0]
    assert (expected != 0).sum() > 1
    for budget in (0, 256):
        got = qc_scores_of(SlabEncoder(net, slab_budget_mb=budget), index, labels, target=32)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def _near_ties(softmax: torch.Tensor, gap: float = 1e-5) -> torch.Tensor:
    """Voxels whose two largest probabilities are within ``gap``: their argmax is round-off's to pick."""
    top = softmax.topk(2, 0).values
    return top[0] - top[1] < gap


def test_streamed_robust_chain_equals_robust_segmenter_stages():
    robust = _randomise_batchnorm(RobustSegmenter(), seed=5)
    volume = torch.rand((32, 32, 32), generator=torch.Generator().manual_seed(6))
    x = volume[None, None]
    _calibrate_head(robust.segmenter, x)
    with torch.no_grad():
        g = one_hot_argmax(robust.segmenter(x), DENOISER_GROUPS)
    _calibrate_head(robust.denoiser, g)
    with torch.no_grad():
        second = torch.cat([x, one_hot_argmax(robust.denoiser(g), DENOISER_GROUPS)], 1)
    _calibrate_head(robust.segmenter2, second)
    with torch.no_grad():
        expected = robust.stages(volume)
    for name in ("groups", "denoised"):  # every group wins somewhere: the argmax maps are tested
        assert len(expected[name].argmax(0).unique()) == DENOISER_GROUPS
    seg = SynthSeg2Segmenter.__new__(SynthSeg2Segmenter)  # its networks only, no model files
    seg.robust_first = SlabNetwork(robust.segmenter, slab_budget_mb=0)
    seg.denoiser = SlabNetwork(robust.denoiser, slab_budget_mb=0)
    seg.network = SlabNetwork(robust.segmenter2, slab_budget_mb=0)

    # each stage, streamed, on the reference's own input: its argmax map (away from near-ties) and
    # its softmax equal the whole-volume pass's
    groups = streamed_argmax(seg.robust_first, x)
    ties = _near_ties(expected["groups"])
    assert torch.equal(groups[~ties], expected["groups"].argmax(0).to(torch.uint8)[~ties])
    reference_groups = expected["groups"].argmax(0).to(torch.uint8)
    denoised = _streamed_softmax_of(seg.denoiser, one_hot_input(reference_groups, DENOISER_GROUPS))
    assert (denoised - expected["denoised"]).abs().max() < 1e-5
    reference_denoised = expected["denoised"].argmax(0).to(torch.uint8)
    post = streamed_softmax(seg.network, one_hot_input(reference_denoised, DENOISER_GROUPS, volume))
    assert (post.permute(3, 0, 1, 2) - expected["posteriors"]).abs().max() < 1e-5

    # the pipeline's chain end to end: the same posteriors, but where a near-tie voxel of the first
    # two argmax maps flipped (its neighbours then see another input)
    fractions = []
    post = seg._robust_posteriors(volume, fractions.append)
    assert post.shape == expected["posteriors"].shape
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    close = ((post - expected["posteriors"]).abs() < 1e-5).all(0)
    assert close.float().mean() > 0.99
    if (_near_ties(expected["groups"]) | _near_ties(expected["denoised"])).sum() == 0:
        assert close.all()
