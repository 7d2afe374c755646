"""Direct tests of the preprocessing, auto-crop and postprocessing functions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import label as scipy_label

from SynthSegMONAILib.half_float import as_float32
from SynthSegMONAILib.head_box import crop_of_field, field_span, head_spans, network_field
from SynthSegMONAILib.model_file import DEFAULT_PREPROCESSING
from SynthSegMONAILib.postprocess import (
    bounding_box,
    brain_mask,
    for_row_blocks,
    largest_component,
    postprocess_default,
    postprocess_fast,
)
from SynthSegMONAILib.preprocess import (
    Preprocessing,
    centre_crop_box,
    linear_along_axis,
    needs_resampling,
    normalise,
    orientation_to_ras,
    padding_box,
    reorient_to_ras,
    resample_grid,
    resample_linear,
    resample_to_1mm,
    resampled_affine,
    round_up,
)
from SynthSegMONAILib.volumes import soft_volumes

# ------------------------------------------------------------------------------ preprocessing


def test_preprocessing_defaults_are_the_model_files():
    assert Preprocessing().to_dict() == DEFAULT_PREPROCESSING
    assert Preprocessing.from_dict(DEFAULT_PREPROCESSING) == Preprocessing()


def test_preprocessing_from_metadata_types_and_unknown_keys():
    pre = Preprocessing.from_dict({"min_pad": 32, "intensity_percentiles": [1, 99], "posterior_smoothing_sigma": None,
                                   "mask_threshold": 0.3, "a_future_setting": 1})
    assert pre.min_pad == 32 and pre.intensity_percentiles == (1.0, 99.0)
    assert pre.posterior_smoothing_sigma is None and pre.mask_threshold == 0.3
    assert pre.flip_averaging is True  # missing: the default
    with pytest.raises(dataclasses.FrozenInstanceError):
        pre.min_pad = 64


@pytest.mark.parametrize("zooms,expected", [((1, 1, 1), False), ((0.95, 1.05, 1), False), ((0.94, 1, 1), True),
                                            ((1, 1, 1.06), True), ((0.9, 0.9, 5.5), True)])
def test_needs_resampling_uses_the_tolerance(zooms, expected):
    assert needs_resampling(np.array(zooms)) is expected


def test_resample_grid_shape_and_affine_agree():
    affine = np.diag([0.9, 1.0, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 30]
    shape = (50, 40, 12)
    grid = resample_grid(shape, affine)
    assert grid.shape == (45, 40, 30)  # ceil(n * voxel size)
    new = resampled_affine(affine)
    for k in ([0, 0, 0], [3, 0, 0], [0, 5, 0], [1, 2, 7]):  # new voxel k: old coordinate start + k * step
        old = grid.start + np.asarray(k) * grid.step
        np.testing.assert_allclose(new @ np.r_[k, 1], affine @ np.r_[old, 1], atol=1e-9)


def test_linear_interpolation_is_exact_on_linear_data():
    x = np.arange(10, dtype=np.float64)[:, None] * 2.0 + np.zeros((1, 3))
    out = linear_along_axis(x, 0, np.array([0.0, 0.5, 4.25, 9.0]))
    np.testing.assert_allclose(out[:, 0], [0.0, 1.0, 8.5, 18.0])
    single = linear_along_axis(np.ones((1, 2)), 0, np.array([0.0, 0.3]))
    assert single.shape == (2, 2)


def test_resampling_a_1mm_grid_is_the_identity_but_for_the_blur():
    data = np.random.default_rng(0).random((6, 7, 8))
    grid = resample_grid(data.shape, np.eye(4))
    np.testing.assert_allclose(resample_linear(data, grid), data)
    out, affine, _ = resample_to_1mm(data, np.eye(4))
    assert out.shape == data.shape and np.allclose(affine, np.eye(4))
    assert not np.allclose(out, data)  # SynthSeg blurs 1 mm axes too (sigma 0.25)


@pytest.mark.parametrize("axes,signs", [((0, 1, 2), (1, 1, 1)), ((1, 2, 0), (-1, 1, -1)), ((2, 0, 1), (1, -1, 1))])
def test_reorientation_round_trip_and_world_coordinates(axes, signs):
    rng = np.random.default_rng(1)
    data = rng.random((4, 5, 6))
    affine = np.zeros((4, 4))
    for voxel_axis, world_axis in enumerate(axes):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * (1 + voxel_axis)
    affine[:, 3] = [3, -4, 5, 1]
    ras, ras_affine, o = reorient_to_ras(data, affine)
    assert o == orientation_to_ras(affine)
    np.testing.assert_array_equal(o.from_ras(o.to_ras(data)), data)
    assert np.all(np.diag(ras_affine)[:3] > 0)
    idx = np.array([1, 2, 3])
    ras_idx = np.array(np.unravel_index(np.ravel_multi_index(tuple(idx), data.shape), data.shape))
    # the same voxel, found in the RAS array, lies at the same place in the world
    value = data[tuple(idx)]
    where = np.argwhere(ras == value)[0]
    np.testing.assert_allclose(ras_affine @ np.r_[where, 1], affine @ np.r_[ras_idx, 1])


def test_round_up_and_centre_crop_like_synthseg():
    assert [round_up(n, 32) for n in (1, 32, 33, 64)] == [32, 32, 64, 64]
    # sizes rounded up to 32, start floor((n - c) / 2), axes shorter than the crop kept whole
    assert centre_crop_box((100, 50, 70), [48, 64, 64]) == (slice(18, 82), slice(0, 50), slice(3, 67))


def test_normalise_clips_to_percentiles():
    data = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    norm = normalise(data, 0.5, 99.5)
    assert norm.min() == 0 and norm.max() == 1
    lo, hi = np.percentile(data, [0.5, 99.5])
    np.testing.assert_allclose(norm[5, 5, 5], (555 - lo) / (hi - lo))
    assert not normalise(np.full((3, 3, 3), 7.0)).any()


def test_padding_box_floor_low_side_and_minimum():
    assert padding_box((100, 128, 129), [128] * 3) == ((14, 14), (0, 0), (15, 16))
    assert padding_box((40, 40, 40), [32] * 3) == ((12, 12), (12, 12), (12, 12))


# ------------------------------------------------------------------------------ auto-crop


def _head(shape=(120, 110, 100), centre=(60, 50, 55), radii=(40, 35, 30)) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    r = sum(((g[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return np.where(r < 1, 0.6, 0.0)


def test_head_spans_ignore_markers_and_noise():
    norm = _head()
    assert head_spans(norm) == ((21, 100), (16, 85), (26, 85))
    noisy = norm.copy()
    noisy[2, 3, 4] = noisy[110, 100, 90] = 1.0  # bright noise voxels
    noisy[110:114, 5:9, 5:9] = 0.9  # a detached marker
    noisy[norm == 0] += np.random.default_rng(0).random(np.count_nonzero(norm == 0)) * 0.05  # faint noise
    assert head_spans(noisy) == head_spans(norm)
    assert head_spans(np.zeros((10, 10, 10))) is None


@pytest.mark.parametrize("n,head,margin", [(256, (40, 215), 8), (256, (2, 238), 8), (256, (60, 120), 0),
                                           (100, (10, 90), 8), (181, (18, 162), 8), (256, (31, 223), 8)])
def test_field_span_holds_the_head_on_the_pooling_grid(n, head, margin):
    padding = padding_box((n,), [128])[0]
    full = n + sum(padding)
    start, stop = field_span(n, padding, head, margin, multiple=32, align=16, min_size=128)
    assert (stop - start) % 32 == 0 and stop - start >= 128 and start % 16 == 0
    assert 0 <= start and stop <= full
    assert start <= max(head[0] - margin + padding[0], 0) and stop >= min(head[1] + margin + padding[0], full)


def test_field_is_the_whole_volume_when_padded_to_the_minimum():
    """SynthSeg's fixtures (inputs under 128 voxels a side) are never cropped: same run, bit for bit."""
    norm = _head(shape=(96, 80, 81), centre=(48, 40, 40), radii=(20, 20, 20))
    padding = padding_box(norm.shape, [128] * 3)
    field = network_field(norm, padding, 32, 16, 128)
    assert field == ((0, 128), (0, 128), (0, 128))
    box, pads = crop_of_field(norm.shape, padding, field)
    assert box == tuple(slice(0, n) for n in norm.shape) and pads == padding


def test_crop_of_field_pastes_back_exactly():
    norm = _head(shape=(200, 230, 190), centre=(100, 120, 120), radii=(50, 60, 50))
    padding = padding_box(norm.shape, [128] * 3)
    field = network_field(norm, padding, 32, 16, 128)
    box, pads = crop_of_field(norm.shape, padding, field)
    whole = np.pad(norm, padding)
    block = np.pad(norm[box], pads)
    np.testing.assert_array_equal(block, whole[tuple(slice(a, b) for a, b in field)])
    assert block.size < whole.size and np.count_nonzero(norm[box]) == np.count_nonzero(norm)


# ------------------------------------------------------------------------------ postprocessing


def test_largest_component_six_connected_first_wins_ties():
    m = np.zeros((5, 5, 5), dtype=bool)
    m[0, 0, 0] = m[1, 1, 1] = True  # diagonal neighbours are not 6-connected: a tie of two
    np.testing.assert_array_equal(np.argwhere(largest_component(m)), [[0, 0, 0]])
    m[3:5, 3, 3] = True
    np.testing.assert_array_equal(np.argwhere(largest_component(m)), [[3, 3, 3], [4, 3, 3]])
    assert not largest_component(np.zeros((3, 3, 3), dtype=bool)).any()
    assert bounding_box(m) == (slice(0, 5), slice(0, 4), slice(0, 4))
    assert bounding_box(np.zeros((2, 2, 2), dtype=bool)) is None


def test_row_blocks_in_order_on_threads():
    assert for_row_blocks(10, lambda a, b: (a, b), threads=2, rows=3) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def _posteriors(shape=(24, 20, 18), channels=7, seed=0) -> np.ndarray:
    """Smooth random posteriors (X, Y, Z, C) with blobs, so that components are non-trivial."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    logits = gaussian_filter(rng.normal(size=(*shape, channels)), sigma=(2, 2, 2, 0)) * 12
    logits[..., 0] += np.where(np.indices(shape)[0] < 4, 6, 0)  # a background slab
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _reference_default(post, classes, crop, threshold):
    """SynthSeg's predict_synthseg.postprocess (default mode), written plainly."""
    post = post.copy()
    mask = post[..., 1:].sum(axis=-1) > threshold
    components, n = scipy_label(mask)
    if n:
        mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    post[..., 1:] *= mask[..., None]
    above = post > threshold
    for cls in np.unique(classes)[1:]:
        idx = np.where(classes == cls)[0]
        union = np.any(above[..., idx], axis=-1)
        components, n = scipy_label(union)
        if n:
            union = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
        for i in idx:
            post[..., i] *= union
    post = post[(*crop, slice(None))]
    post /= post.sum(axis=-1)[..., None]
    return post, post.argmax(-1)


def _reference_fast(post, crop, threshold, low):
    post = post[(*crop, slice(None))].copy()
    mask = post[..., 1:].sum(axis=-1) > threshold
    components, n = scipy_label(mask)
    if n:
        mask = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    post[..., 1:] *= mask[..., None]
    post[..., 1:] *= post[..., 1:] > low
    post /= post.sum(axis=-1)[..., None]
    return post, post.argmax(-1)


CLASSES = np.array([0, 1, 1, 2, 0, 3, 4])  # two channels in one class; class-0 channel 4 (like CSF)
CROP = (slice(2, 22), slice(1, 19), slice(0, 18))


@pytest.mark.parametrize("threads", [1, 2])
def test_postprocess_default_is_synthsegs(threads):
    post = _posteriors()
    expected, expected_index = _reference_default(post, CLASSES, CROP, 0.25)
    got, index = postprocess_default(post.copy(), CLASSES, CROP, 0.25, threads=threads)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_postprocess_default_empties_a_class_without_voxels():
    post = _posteriors()
    post[..., 6] = np.minimum(post[..., 6], 0.1)  # class 4 never above the threshold
    got, index = postprocess_default(post.copy(), CLASSES, CROP, 0.25)
    assert not got[..., 6].any() and not (index == 6).any()
    np.testing.assert_array_equal(index, _reference_default(post, CLASSES, CROP, 0.25)[1])


def test_postprocess_default_by_class_for_many_channels():
    from SynthSegMONAILib.postprocess import _postprocess_default_by_class

    post = _posteriors()
    classes = [np.flatnonzero(CLASSES == c) for c in np.unique(CLASSES)[1:]]
    got, index = _postprocess_default_by_class(post.copy(), classes, CROP, 0.25, 1)
    expected, expected_index = _reference_default(post, CLASSES, CROP, 0.25)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 2])
def test_postprocess_fast_is_synthsegs(threads):
    post = _posteriors(seed=3)
    expected, expected_index = _reference_fast(post, CROP, 0.25, 0.2)
    got, index = postprocess_fast(post.copy(), CROP, 0.25, 0.2, threads=threads)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_float16_posteriors_are_postprocessed_in_float32():
    post16 = _posteriors(seed=5).astype(np.float16)
    post32 = post16.astype(np.float32)
    for run in (lambda p: postprocess_default(p, CLASSES, CROP, 0.25), lambda p: postprocess_fast(p, CROP, 0.25, 0.2)):
        got16, index16 = run(post16.copy())
        got32, index32 = run(post32.copy())
        assert got16.dtype == np.float16
        np.testing.assert_array_equal(index16, index32)
        np.testing.assert_allclose(got16.astype(np.float32), got32, atol=1e-3)


@pytest.mark.parametrize("view", [(slice(None),) * 3, (slice(None, None, -1), slice(None), slice(None, None, -1))],
                         ids=["as stored", "axes reversed"])
def test_soft_volumes_of_float16_posteriors_are_the_float32_sums_of_their_values(view):
    post16 = _posteriors(seed=7).astype(np.float16)[view]
    expected = soft_volumes(np.array(post16, dtype=np.float32))  # NumPy's own conversion, same order
    before = post16.copy()
    got = soft_volumes(post16)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(post16, before)
    np.testing.assert_array_equal(as_float32(post16), np.array(post16, dtype=np.float32))


def test_brain_mask_is_the_largest_component_of_the_non_background():
    post = _posteriors()
    expected = largest_component(post[..., 1:].sum(-1) > 0.25)
    np.testing.assert_array_equal(brain_mask(post, 0.25, threads=2), expected)
