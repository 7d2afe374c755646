"""Dice evaluation: known values on hand-made volumes, SynthSeg's aseg conventions, references on
other grids, folder mode with its CSV, bad input, and the benchmark's thick-slice simulation."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.evaluation import IGNORE, evaluate, map_aseg, resample_nearest, score
from SynthSegMONAILib.labels import synthseg_labels

REPO = Path(__file__).resolve().parents[3]
LABELS = synthseg_labels("2.0")
LIA = np.array([[-1.0, 0, 0, 120.1], [0, 0, 1, -85.4], [0, -1, 0, 137.6], [0, 0, 0, 1]])  # FreeSurfer conformed


def _img(data: np.ndarray, affine=None) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data, dtype=np.int32), np.eye(4) if affine is None else affine)


def _cubes() -> tuple[np.ndarray, np.ndarray]:
    """seg: 17 in a 4^3 cube, 53 in a 2^3 cube; ref: 17 in a 5x4x4 box overlapping 3x4x4, 53 the same."""
    seg, ref = np.zeros((12, 10, 10), np.int32), np.zeros((12, 10, 10), np.int32)
    seg[2:6, 2:6, 2:6] = 17  # 64 voxels
    ref[3:8, 2:6, 2:6] = 17  # 80 voxels, 48 shared
    seg[8:10, 7:9, 7:9] = 53  # 8 voxels
    ref[8:10, 7:9, 7:9] = 53
    return seg, ref


def test_dice_and_volumes_of_two_cubes_by_hand():
    seg, ref = _cubes()
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm^3 voxels
    ev = evaluate(_img(seg, affine), _img(ref, affine), ref_format="labels")
    assert ev.dice[17] == pytest.approx(2 * 48 / (64 + 80))
    assert ev.dice[53] == 1.0
    assert set(ev.dice) == {0, 17, 53}  # structures absent from both are left out
    assert ev.mean_dice == pytest.approx((2 * 48 / 144 + 1.0) / 2)  # background excluded
    # hippocampus left (17) and right (53) pooled: 2 (48 + 8) / (72 + 88)
    assert ev.merged_dice == {"Hippocampus": pytest.approx(2 * 56 / 160)}
    assert ev.mean_merged_dice == pytest.approx(2 * 56 / 160)
    assert ev.seg_volume[17] == 128.0 and ev.ref_volume[17] == 160.0
    assert ev.volume_difference[17] == pytest.approx(-0.2)
    assert ev.scored_voxels == seg.size
    json.dumps(ev.to_dict())


def test_aseg_conventions_merge_corpus_callosum_and_ignore_unlisted_labels():
    ref = np.zeros((10, 6, 6), np.int32)
    ref[:4] = 2  # left cerebral WM: 144 voxels
    ref[6:] = 41  # right cerebral WM: 144 voxels
    ref[4, 3, 3] = 251  # corpus callosum, 1 voxel from left WM, 2 from right -> 2
    ref[5, 2, 2] = 252  # 2 from left, 1 from right -> 41
    ref[4, 0, 0] = 77  # WM hypointensity next to left WM -> 2
    ref[5, 3, 3] = 30  # vessel: not a SynthSeg label, ignored
    seg = np.where(np.isin(ref, [2, 41]), ref, 0)
    seg[4, 3, 3], seg[5, 2, 2], seg[4, 0, 0] = 2, 41, 2
    seg[5, 3, 3] = 17  # wrong, but where the reference is ignored
    ev = evaluate(_img(seg), _img(ref), ref_format="aseg", labels=LABELS)
    assert ev.dice == {0: 1.0, 2: 1.0, 41: 1.0}  # 17 only in an ignored voxel: not scored
    assert ev.scored_voxels == ref.size - 1
    assert ev.ref_volume[2] == 146.0 and ev.ref_volume[41] == 145.0

    seg[4, 3, 3] = 41  # the corpus callosum voxel given to the far hemisphere
    ev = evaluate(_img(seg), _img(ref), ref_format="aseg", labels=LABELS)
    assert ev.dice[2] == pytest.approx(2 * 145 / (145 + 146))
    assert ev.dice[41] == pytest.approx(2 * 145 / (146 + 145))

    # the same volumes as plain labels: 251, 252, 77, 30 are structures of their own
    plain = evaluate(_img(seg), _img(ref), ref_format="labels")
    assert {251, 252, 77, 30, 17} <= set(plain.dice) and plain.dice[251] == 0.0

    # the same mapping as channel indices (the round-recipe proxy scores with it)
    channels = map_aseg(ref, LABELS)
    assert channels[4, 3, 3] == LABELS.index(2) and channels[5, 2, 2] == LABELS.index(41)
    assert channels[5, 3, 3] == IGNORE and channels[0, 0, 0] == LABELS.index(2)


def test_reference_stored_flipped_and_permuted_matches_exactly():
    seg, _ = _cubes()
    seg_affine = np.array([[1.0, 0, 0, -5], [0, 1, 0, 3], [0, 0, 1, 7], [0, 0, 0, 1]])
    n = seg.shape[0]
    ref = seg[::-1].transpose(1, 0, 2)  # ref[p, q, r] = seg[n-1-q, p, r]
    to_seg = np.array([[0, -1.0, 0, n - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    ev = evaluate(_img(seg, seg_affine), _img(ref, seg_affine @ to_seg), ref_format="labels")
    assert ev.dice == {0: 1.0, 17: 1.0, 53: 1.0}
    assert ev.scored_voxels == seg.size
    # the same data with the unflipped affine is misplaced: the check can fail
    wrong = evaluate(_img(seg, seg_affine), _img(seg[::-1], seg_affine), ref_format="labels")
    assert wrong.dice[17] < 0.5


def test_voxels_outside_the_reference_are_ignored():
    seg, ref = np.zeros((10, 4, 4), np.int32), np.zeros((10, 4, 4), np.int32)
    seg[0:4] = 17
    ref[0:4] = 17
    ref_affine = np.eye(4)
    ref_affine[0, 3] = 2.0  # ref voxel i sits on seg voxel i + 2: seg x = 0, 1 are outside
    ev = evaluate(_img(seg), _img(ref, ref_affine), ref_format="labels")
    assert ev.scored_voxels == 8 * 16
    # seg 17 scored at x = 2, 3 (32 voxels); ref 17 at x = 2..5 (64 voxels), all 32 shared
    assert ev.dice[17] == pytest.approx(2 * 32 / (32 + 64))


def test_resample_nearest_onto_a_finer_grid():
    ref = np.arange(8).reshape(2, 2, 2)
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = -0.25  # 4^3 grid covering the same space
    out = resample_nearest(ref, np.eye(4), (4, 4, 4), fine)
    assert np.array_equal(out, ref.repeat(2, 0).repeat(2, 1).repeat(2, 2))


def test_score_without_structures_ignores_marked_voxels():
    seg = np.array([[[1, 1, 2, 2, 3]]])
    ref = np.array([[[1, IGNORE, 2, 1, 2]]])
    ev = score(seg, ref)  # scored pairs (seg, ref): (1, 1), (2, 2), (2, 1), (3, 2)
    assert ev.dice == {1: pytest.approx(2 * 1 / 3), 2: pytest.approx(2 * 1 / 4), 3: 0.0}
    assert ev.scored_voxels == 4


def _save(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=np.int32)
    affine = np.eye(4) if affine is None else affine
    img = nib.MGHImage(data, affine) if path.name.endswith(".mgz") else nib.Nifti1Image(data, affine)
    nib.save(img, str(path))
    return path


def test_folder_mode_writes_one_row_per_subject(tmp_path, capsys):
    seg, ref = _cubes()
    seg_dir, ref_dir = tmp_path / "seg", tmp_path / "ref"
    _save(seg_dir / "a_synthseg.nii.gz", seg)
    _save(seg_dir / "b.nii.gz", ref)  # b: perfect
    _save(seg_dir / "a_posteriors.nii.gz", seg)  # SynthSeg's other output: skipped
    _save(seg_dir / "lonely_synthseg.nii.gz", seg)  # no reference: warned and skipped
    _save(ref_dir / "a.nii.gz", ref)
    _save(ref_dir / "b" / "aseg.mgz", ref)
    out = tmp_path / "out" / "dice.csv"
    assert main(["evaluate", "--seg", str(seg_dir), "--ref", str(ref_dir), "--ref-format", "labels",
                 "--csv", str(out)]) == 0
    printed = capsys.readouterr()
    assert "no reference for lonely_synthseg.nii.gz" in printed.err
    assert "mean Dice over 2 subjects" in printed.out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == ["subject", "mean", "mean (hemispheres merged)", "Left-Hippocampus",
                             "Right-Hippocampus"]
    assert float(rows[0]["Left-Hippocampus"]) == pytest.approx(2 * 48 / 144, abs=1e-6)
    assert float(rows[1]["Left-Hippocampus"]) == 1.0 and float(rows[1]["mean"]) == 1.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["dice.csv"]  # no temporary left


def test_single_files_print_the_table_and_means(tmp_path, capsys):
    seg, ref = _cubes()
    assert main(["evaluate", "--seg", str(_save(tmp_path / "s.nii.gz", seg)),
                 "--ref", str(_save(tmp_path / "aseg.mgz", ref))]) == 0
    out = capsys.readouterr().out
    assert "Left-Hippocampus" in out and "0.6667" in out
    assert "mean Dice, hemispheres merged: 0.7000" in out


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("intensities", "non-integer values"),
    ("apart", "do not overlap"),
    ("file_vs_folder", "both be files or both be folders"),
    ("no_match", "matches a reference"),
    ("4d", "3D label volume"),
])
def test_bad_input_exits_1_with_a_message(tmp_path, capsys, case, message):
    seg, ref = _cubes()
    s = _save(tmp_path / "s.nii.gz", seg)
    r = _save(tmp_path / "r.nii.gz", ref)
    if case == "missing":
        r = tmp_path / "nope.nii.gz"
    elif case == "intensities":
        nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(0, 100, ref.shape).astype(np.float32),
                                 np.eye(4)), str(r))
    elif case == "apart":
        far = np.eye(4)
        far[:3, 3] = 500.0
        r = _save(r, ref, far)
    elif case == "file_vs_folder":
        r = tmp_path
    elif case == "no_match":
        s, r = tmp_path / "sd", tmp_path / "rd"
        _save(s / "x.nii.gz", seg)
        _save(r / "y.nii.gz", ref)
    elif case == "4d":
        nib.save(nib.Nifti1Image(np.stack([ref, ref], -1), np.eye(4)), str(r))
    assert main(["evaluate", "--seg", str(s), "--ref", str(r), "--ref-format", "labels"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.fixture(scope="module")
def evaluate_model():
    """The benchmark script as a module (``machine`` lives beside it)."""
    folder = REPO / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location("evaluate_model", folder / "evaluate_model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def _corners(shape, affine) -> np.ndarray:
    """World coordinates of the outer faces' corners (voxel edges, not centres)."""
    lo, hi = np.full(3, -0.5), np.asarray(shape, float) - 0.5
    return np.array([nib.affines.apply_affine(affine, c) for c in (lo, hi)])


@pytest.mark.parametrize("n_slices", [10, 12])
def test_thick_slices_keep_the_extent_and_set_5mm(evaluate_model, tmp_path, n_slices):
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 100, (6, n_slices, 7)).astype(np.float32)
    img = nib.MGHImage(data, LIA)
    assert evaluate_model.axial_axis(LIA) == 1  # LIA: the second axis runs inferior
    thick = evaluate_model.thick_slices(img)
    nib.save(thick, str(tmp_path / "thick.nii.gz"))
    thick = nib.load(tmp_path / "thick.nii.gz")
    assert thick.shape == (6, n_slices // 5, 7)
    assert np.allclose(thick.header.get_zooms(), (1.0, 5.0, 1.0))
    assert np.allclose(np.asarray(thick.dataobj)[:, 1], data[:, 5:10].mean(1), atol=1e-4)
    # thick voxel centre = the centre of the five thin voxels it averages
    centre = nib.affines.apply_affine(thick.affine, [2, 1, 3])
    assert np.allclose(centre, nib.affines.apply_affine(LIA, [2, 7, 3]), atol=1e-4)
    orig, new = _corners(data.shape, LIA), _corners(thick.shape, thick.affine)
    assert np.allclose(orig[0], new[0], atol=1e-4)  # same first face
    dropped = n_slices % 5  # slices beyond the last whole thick slice
    assert np.allclose(np.abs(orig[1] - new[1]), [0, 0, dropped], atol=1e-4)
