"""The generative model: label handling, spatial and intensity augmentation, reproducibility."""

from __future__ import annotations

import json
import math

import cornucopia as cc
import nibabel as nib
import numpy as np
import pytest
import torch
from training_fixtures import ARRAYS_JSON, LABEL_MAPS, needs_maps

from SynthSegMONAILib.labels import structure, synthseg_labels
from SynthSegMONAITrainingLib.config import SynthesisConfig
from SynthSegMONAITrainingLib.label_maps import LabelMap, LabelMapError, load_generation_table, load_label_map
from SynthSegMONAITrainingLib.synthesis import Synthesizer

NO_SPATIAL = dict(scaling_bounds=0.0, rotation_bounds=0.0, shearing_bounds=0.0, nonlin_std=0.0)


@pytest.fixture(scope="module")
def table():
    return load_generation_table("1.0")


@pytest.fixture(scope="module")
def map4(table):
    """One real training map at 4 mm (about 56 x 64 x 64 voxels)."""
    return load_label_map(LABEL_MAPS / "training_seg_01.nii.gz", table, downsample=4)


@pytest.fixture(scope="module")
def map2(table):
    """A float-stored training map at 2 mm."""
    return load_label_map(LABEL_MAPS / "training_seg_16.nii.gz", table, downsample=2)


def input_channels(table, lm: LabelMap) -> set[int]:
    return set(table.target_channels()[np.unique(lm.indices.numpy())].tolist())


@pytest.mark.skipif(not ARRAYS_JSON.is_file(), reason="reference arrays not available")
def test_generation_table_is_synthseg_mapping():
    ref = json.loads(ARRAYS_JSON.read_text())
    t1, t2 = load_generation_table("1.0"), load_generation_table("2.0")
    assert t1.labels.tolist() == ref["generation_labels"]
    assert t1.classes.tolist() == ref["generation_classes"]
    assert t1.n_classes == 48
    assert t1.targets.tolist() == ref["synthseg_segmentation_labels"]
    # 2.0 keeps CSF (24), everything else as 1.0
    expected_v2 = [24 if g == 24 else t for g, t in zip(ref["generation_labels"], ref["synthseg_segmentation_labels"])]
    assert t2.targets.tolist() == expected_v2
    # lesions -> white matter, split ventricles -> ventricles, extra-cerebral -> background
    m = dict(zip(t1.labels.tolist(), t1.targets.tolist()))
    assert (m[25], m[57], m[136], m[137], m[163], m[164]) == (2, 41, 4, 5, 43, 44)
    assert all(m[g] == 0 for g in (502, 506, 507, 508, 509, 511, 512, 514, 515, 516, 530, 24, 30, 62, 72, 85))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_every_target_label_reachable_in_table(version):
    t = load_generation_table(version)
    assert sorted(set(t.targets.tolist())) == synthseg_labels(version)


@needs_maps
def test_every_target_label_reachable_in_samples(table, map4):
    synth = Synthesizer(SynthesisConfig(crop_size=[64, 64, 64], flip_probability=0.0, **NO_SPATIAL), table)
    seen = set()
    for seed in range(3):
        _, target, _ = synth.sample([map4], seed)
        seen |= set(target.unique().tolist())
    assert seen == set(range(32))


@needs_maps
def test_labels_survive_deformation(table, map2):
    # crops as large as the map, default (SynthSeg 1.0) affine and elastic deformation
    crop = [int(math.ceil(s / 16) * 16) for s in map2.indices.shape]
    synth = Synthesizer(SynthesisConfig(crop_size=crop), table)
    before = input_channels(table, map2)
    for seed in range(2):
        _, target, p = synth.sample([map2], seed)
        after = set(target.unique().tolist())
        assert after <= before  # nearest neighbour: no new labels
        assert after == before, f"lost {before - after} with svf std {p.svf_std:.2f}"


@needs_maps
def test_identity_deformation_keeps_the_map(table, map4):
    shape = list(map4.indices.shape)
    synth = Synthesizer(SynthesisConfig(crop_size=shape, flip_probability=0.0, **NO_SPATIAL), table)
    _, target, _ = synth.sample([map4], 0)
    assert torch.equal(target[0], synth.channels[map4.indices.long()])


@needs_maps
def test_flip_swaps_sides_and_labels(table, map4):
    shape = list(map4.indices.shape)
    plain = Synthesizer(SynthesisConfig(crop_size=shape, flip_probability=0.0, **NO_SPATIAL), table)
    flipped = Synthesizer(SynthesisConfig(crop_size=shape, flip_probability=1.0, **NO_SPATIAL), table)
    _, t0, p0 = plain.sample([map4], 5)
    _, t1, p1 = flipped.sample([map4], 5)
    assert not p0.flip and p1.flip
    labels = synthseg_labels("1.0")
    swap = torch.tensor([labels.index(structure(lab).lr_pair or lab) for lab in labels])
    assert torch.equal(t1[0], swap[t0[0].flip(0)])
    # anatomy stays consistent: left structures remain on the left (low x in RAS) after the flip
    xs = torch.arange(shape[0], dtype=torch.float32)[:, None, None]
    for t in (t0[0], t1[0]):
        left = (t == labels.index(2)).float()
        right = (t == labels.index(41)).float()
        assert (left * xs).sum() / left.sum() < (right * xs).sum() / right.sum()


def test_parameters_within_configured_ranges(table):
    cfg = SynthesisConfig(mean_range=[20.0, 80.0], std_range=[1.0, 3.0], bias_field_std=0.3, gamma_std=0.2,
                          isotropic_resolution_range=[1.5, 3.0], anisotropic_resolution_range=[2.0, 6.0],
                          background_zero_probability=0.0, background_dark_probability=0.0)
    synth = Synthesizer(cfg, table)
    fake = [LabelMap("fake", torch.zeros((40, 40, 40), dtype=torch.uint8), (1.0, 1.0, 1.0))]
    gen = torch.Generator().manual_seed(0)
    native = 0
    params = [synth.draw_parameters(gen, fake, [32, 32, 32]) for _ in range(400)]
    for p in params:
        assert p.means.min() >= 20 and p.means.max() <= 80 and p.stds.min() >= 1 and p.stds.max() <= 3
        assert 0 <= p.bias_std <= 0.3
        assert 0 <= p.svf_std <= cfg.nonlin_std
        coarse = [r for r in p.resolution_mm if r > 1]
        if not coarse:
            native += 1
        elif len(coarse) == 3:
            assert len(set(coarse)) == 1 and 1.5 <= coarse[0] <= 3.0
        else:
            assert len(coarse) == 1 and 2.0 <= coarse[0] <= 6.0
        for r, t in zip(p.resolution_mm, p.thickness_mm):
            assert 1.0 <= t <= r
        sv = torch.linalg.svdvals(p.affine)
        assert sv.max() <= 1.2 * 1.05 and sv.min() >= 0.8 * 0.95
    assert 0 < native < 60  # about 5% at native resolution
    flips = sum(p.flip for p in params)
    assert 150 < flips < 250
    gammas = np.log([p.gamma for p in params])
    assert abs(gammas.std() - 0.2) < 0.05


@needs_maps
def test_image_intensities_and_resolution(table, map4):
    cfg = SynthesisConfig(crop_size=[48, 48, 48], native_resolution_probability=0.0,
                          isotropic_resolution_probability=0.0, anisotropic_resolution_range=[20.0, 20.0],
                          bias_field_probability=0.0)
    synth = Synthesizer(cfg, table)
    for seed in range(3):
        image, target, p = synth.sample([map4], seed)
        assert image.dtype == torch.float32 and image.shape == (1, 48, 48, 48)
        assert image.min() >= 0 and image.max() <= 1
        axis = int(np.argmax(p.resolution_mm))
        grads = [image[0].diff(dim=a).abs().mean().item() for a in range(3)]
        assert grads[axis] < min(g for a, g in enumerate(grads) if a != axis)


@needs_maps
def test_contrast_varies_between_samples(table, map4):
    synth = Synthesizer(SynthesisConfig(crop_size=[48, 48, 48]), table)
    wm = synthseg_labels("1.0").index(2)
    cortex = synthseg_labels("1.0").index(3)
    signs = set()
    for seed in range(12):
        image, target, _ = synth.sample([map4], seed)
        if (target == wm).any() and (target == cortex).any():
            signs.add(bool(image[target == wm].mean() > image[target == cortex].mean()))
    assert signs == {True, False}  # white matter brighter than cortex in some samples, darker in others


@needs_maps
def test_same_seed_same_sample(table, map4):
    synth = Synthesizer(SynthesisConfig(crop_size=[32, 32, 32]), table)
    a, ta, _ = synth.sample([map4], 123)
    b, tb, _ = synth.sample([map4], 123)
    c, _, _ = synth.sample([map4], 124)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


def test_cornucopia_smooth_is_per_axis():
    x = torch.zeros(1, 16, 16, 16)
    x[:, 8] = 1.0  # a plane across axes 1 and 2
    y = cc.SmoothTransform(fwhm=[0.0, 3.0, 3.0])(x)
    assert torch.allclose(y, x, atol=1e-5)  # smoothing along the plane does not change it
    z = cc.SmoothTransform(fwhm=[3.0, 0.0, 0.0])(x)
    assert z[0, 7, 5, 5] > 0.1 and abs(z.sum() - x.sum()) < 1e-2 * x.sum()


def test_cornucopia_gamma_is_power():
    x = torch.rand(1, 8, 8, 8) * 0.98 + 0.01
    y = cc.GammaFinalTransform(1.7, 0.0, 1.0)(x)
    assert torch.allclose(y, x ** 1.7, atol=1e-4)


# -- reading label maps --------------------------------------------------------------------
def _save(path, data, dtype):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), np.diag([-1.0, 1, 1, 1])), str(path))
    return path


def _tiny_map():
    data = np.zeros((12, 12, 12))
    data[2:6, 2:10, 2:10] = 2
    data[6:10, 2:10, 2:10] = 41
    data[5:7, 4:6, 4:6] = 24
    return data


def test_float_label_map_read_as_integers(tmp_path, table):
    a = load_label_map(_save(tmp_path / "f.nii.gz", _tiny_map() + 1e-6, np.float32), table, margin=1)
    b = load_label_map(_save(tmp_path / "i.nii.gz", _tiny_map(), np.int32), table, margin=1)
    assert a.indices.dtype == torch.uint8 and torch.equal(a.indices, b.indices)
    assert set(table.labels[a.indices.unique().numpy()].tolist()) == {0, 2, 41, 24}
    # stored with a flipped x axis: reoriented to RAS, label 41 (right) now at low x
    assert table.labels[int(a.indices[1, 5, 5])] == 41


@pytest.mark.parametrize("case, message", [
    ("non_integer", "non-integer"), ("unknown", "not generation labels"), ("empty", "empty"),
    ("corrupt", "cannot read"), ("missing", "cannot read"), ("2d", "not a 3D volume"),
])
def test_bad_label_maps(tmp_path, table, case, message):
    path = tmp_path / "m.nii.gz"
    if case == "non_integer":
        _save(path, _tiny_map() + 0.4, np.float32)
    elif case == "unknown":
        d = _tiny_map()
        d[0, 0, 0] = 9999
        _save(path, d, np.int32)
    elif case == "empty":
        _save(path, np.zeros((8, 8, 8)), np.int32)
    elif case == "corrupt":
        path.write_bytes(b"\x1f\x8b not really a nifti file")
    elif case == "2d":
        _save(path, np.zeros((8, 8)), np.int32)
    with pytest.raises(LabelMapError, match=message):
        load_label_map(path, table)
