"""The whole pipeline reproduces the original SynthSeg_predict runs (keras-synthseg fixtures)."""

from __future__ import annotations

import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from SynthSegMONAILib.cli import main

RUNS = ["t1_default", "t1_fast", "t1_v1", "t1_crop64", "t2w_default", "t2w_fast", "flair_default",
        "flair_fast", "flair_v1", "flair_crop_96_64_32", "chris_t1_default", "chris_t1_fast",
        "chris_t1_v1_fast", "folder_default"]


def _run_ours(keras_ref: Path, imported_models, run: str, out: Path, monkeypatch) -> int:
    args = shlex.split((keras_ref / "runs" / run / "args.txt").read_text())
    args = [str(out) + a[len(f"runs/{run}"):] if a.startswith(f"runs/{run}") else
            str(keras_ref / a) if a.startswith("inputs/") else a for a in args]
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(imported_models["1.0"].parent))
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(out / "home"))
    if "--v1" not in args:
        args += ["--model", str(imported_models["2.0"])]
    return main(["--threads", "2", *args])


def _compare_csv(ours: Path, ref: Path) -> None:
    raw_ours, raw_ref = ours.read_bytes(), ref.read_bytes()
    assert raw_ours.count(b"\r\n") == raw_ref.count(b"\r\n"), "CSV must use CRLF line ends like SynthSeg"
    rows_o = [r.split(",") for r in raw_ours.decode().split("\r\n") if r]
    rows_r = [r.split(",") for r in raw_ref.decode().split("\r\n") if r]
    assert rows_o[0] == rows_r[0]
    assert [r[0] for r in rows_o] == [r[0] for r in rows_r]
    for ro, rr in zip(rows_o[1:], rows_r[1:], strict=True):
        a, b = np.array(ro[1:], float), np.array(rr[1:], float)
        assert np.all(np.abs(a - b) <= 1e-3 * np.abs(b) + 0.01), (ro, rr)


def _compare_image(ours: Path, ref: Path, kind: str) -> None:
    o, r = nib.load(ours), nib.load(ref)
    assert o.shape == r.shape
    np.testing.assert_allclose(o.affine, r.affine, atol=1e-4)
    assert o.get_data_dtype() == r.get_data_dtype()
    od, rd = o.get_fdata(), r.get_fdata()
    if kind == "synthseg":
        assert (od == rd).mean() >= 0.999
    elif kind == "posteriors":
        assert (np.abs(od - rd) > 1e-2).mean() < 1e-3
        mass_o, mass_r = od.sum(axis=(0, 1, 2)), rd.sum(axis=(0, 1, 2))
        assert np.all(np.abs(mass_o - mass_r) <= 1e-3 * mass_r + 0.01)
    else:  # resampled image: stored in the input's integer type
        assert np.abs(od - rd).max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_pipeline_reproduces_synthseg_run(keras_ref, imported_models, run, tmp_path, monkeypatch):
    ref_dir = keras_ref / "runs" / run
    rc = _run_ours(keras_ref, imported_models, run, tmp_path, monkeypatch)
    assert rc == int((ref_dir / "rc.txt").read_text())
    ref_files = sorted(p.name for p in ref_dir.iterdir() if p.name not in ("args.txt", "rc.txt", "stdout.txt"))
    ours = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert set(ref_files) <= set(ours), f"missing outputs: {set(ref_files) - set(ours)}"
    for name in ref_files:
        if name.endswith(".csv"):
            _compare_csv(tmp_path / name, ref_dir / name)
        else:
            kind = name.split("_")[-1].split(".")[0]
            _compare_image(tmp_path / name, ref_dir / name, kind)
