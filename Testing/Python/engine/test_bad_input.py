"""Bad input: a specific message, a non-zero exit, nothing written; folder mode goes on."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import ModelInfo, save_model
from SynthSegMONAILib.network import SynthSegUNet, UNetConfig


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    labels = synthseg_labels("2.0")
    cfg = UNetConfig(out_channels=len(labels), levels=2, features=4)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_model(path, SynthSegUNet(cfg), ModelInfo(network=cfg, labels=labels, name="tiny"))


def _nifti(path: Path, data: np.ndarray, zooms=(1.0, 1.0, 1.0)) -> Path:
    affine = np.diag([*zooms, 1.0])
    img = nib.Nifti1Image(data, affine)
    if data.ndim >= 3:
        img.header.set_zooms(tuple(zooms) + img.header.get_zooms()[3:])
    nib.save(img, str(path))
    return path


def _good(path: Path) -> Path:
    rng = np.random.default_rng(0)
    return _nifti(path, rng.uniform(0, 100, (24, 24, 24)).astype(np.float32))


def _run(tiny_model, inp: Path, out: Path, capsys, *extra) -> tuple[int, str]:
    rc = main(["--i", str(inp), "--o", str(out), "--model", str(tiny_model), "--threads", "2", *extra])
    return rc, capsys.readouterr().err


def _no_outputs(folder: Path) -> bool:
    return not any(p.is_file() for p in folder.rglob("*"))


def _bad_images(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words the error message must contain)."""
    rng = np.random.default_rng(1)
    vol = rng.uniform(0, 100, (24, 24, 24)).astype(np.float32)
    cases: dict[str, tuple[Path, str]] = {}
    cases["missing"] = (tmp / "missing.nii.gz", "not found")
    (tmp / "notes.txt").write_text("not an image")
    cases["not an image"] = (tmp / "notes.txt", "not an image")
    (tmp / "garbage.nii").write_bytes(b"\x00garbage" * 100)
    cases["garbage bytes"] = (tmp / "garbage.nii", "not a readable image")
    good = _nifti(tmp / "whole.nii.gz", vol).read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    cases["corrupt gzip"] = (tmp / "truncated.nii.gz", "corrupt")
    (tmp / "badgzip.nii.gz").write_bytes(gzip.compress(b"x" * 1000)[:-12] + b"\xff" * 12)
    cases["bad gzip"] = (tmp / "badgzip.nii.gz", "corrupt")
    (tmp / "whole.nii.gz").unlink()
    cases["2D"] = (_nifti(tmp / "slice.nii.gz", vol[:, :, 0]), "2D image")
    cases["4D series"] = (_nifti(tmp / "fmri.nii.gz", np.stack([vol] * 12, -1)), "4D image with 12 volumes")
    cases["constant"] = (_nifti(tmp / "constant.nii.gz", np.full_like(vol, 7)), "constant")
    cases["all zero"] = (_nifti(tmp / "zero.nii.gz", np.zeros_like(vol)), "all zero")
    nan = vol.copy()
    nan[3, 4, 5] = np.nan
    cases["NaN"] = (_nifti(tmp / "nan.nii.gz", nan), "NaN or infinite")
    inf = vol.copy()
    inf[3, 4, 5] = np.inf
    cases["Inf"] = (_nifti(tmp / "inf.nii.gz", inf), "NaN or infinite")
    for name, size in (("zero voxel", 0.0), ("negative voxel", -1.0)):
        # nibabel repairs such headers when saving: patch the stored pixdim[2] (byte 84) instead
        path = _nifti(tmp / f"{name.replace(' ', '_')}.nii", vol)
        raw = bytearray(path.read_bytes())
        raw[84:88] = np.float32(size).tobytes()
        path.write_bytes(bytes(raw))
        cases[name] = (path, "zero or negative")
    cases["absurd voxel"] = (_nifti(tmp / "huge.nii.gz", vol, (1.0, 1.0, 500.0)), "implausible")
    cases["tiny voxel"] = (_nifti(tmp / "tiny.nii.gz", vol, (0.001, 1.0, 1.0)), "implausible")
    return cases


def test_each_bad_image_gets_its_own_message_and_no_output(tiny_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, (path, words) in _bad_images(inputs).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        rc, err = _run(tiny_model, path, out, capsys, "--vol", str(out / "vol.csv"))
        assert rc != 0, name
        assert words in err, f"{name}: {err!r}"
        assert not out.exists() or _no_outputs(out), name


def test_folder_mode_goes_on_after_a_bad_image(tiny_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _good(inputs / "a_good.nii.gz")
    _nifti(inputs / "b_nan.nii.gz", np.full((24, 24, 24), np.nan, dtype=np.float32))
    _good(inputs / "c_good.nii.gz")
    out = tmp_path / "out"
    rc, err = _run(tiny_model, inputs, out, capsys, "--vol", str(out / "volumes.csv"))
    assert rc == 1
    assert "b_nan.nii.gz" in err and "NaN" in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_good_synthseg.nii.gz", "c_good_synthseg.nii.gz"]
    rows = (out / "volumes.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["a_good", "c_good"]


def test_model_that_is_not_a_model_or_was_tampered_with(tiny_model, tmp_path, capsys):
    img = _good(tmp_path / "scan.nii.gz")
    not_model = tmp_path / "weights.safetensors"
    not_model.write_bytes(b"PK\x03\x04 a zip archive, maybe a pickle")
    tampered = tmp_path / "tampered.safetensors"
    raw = bytearray(tiny_model.read_bytes())
    raw[-10] ^= 0xFF  # flip bits in the last tensor's data
    tampered.write_bytes(bytes(raw))
    for model, words in ((not_model, "not a SynthSeg-MONAI model"), (tampered, "checksum mismatch"),
                         (tmp_path / "absent.safetensors", "not found")):
        out = tmp_path / f"out_{model.stem}"
        rc = main(["--i", str(img), "--o", str(out), "--model", str(model)])
        err = capsys.readouterr().err
        assert rc != 0 and words in err, err
        assert not out.exists()


def test_header_read_checks_the_layout_and_leaves_the_checksum_to_the_loader(tiny_model, tmp_path):
    from SynthSegMONAILib.errors import ModelFileError
    from SynthSegMONAILib.model_file import read_model_header, read_model_info

    tampered = tmp_path / "tampered.safetensors"
    raw = bytearray(tiny_model.read_bytes())
    raw[-10] ^= 0xFF  # tensor data only: the header is intact
    tampered.write_bytes(bytes(raw))
    assert read_model_header(tampered) == read_model_info(tiny_model)
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        read_model_info(tampered)
    (tmp_path / "junk.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ModelFileError, match="not a SynthSeg-MONAI model"):
        read_model_header(tmp_path / "junk.safetensors")


def test_output_folder_that_cannot_be_written(tiny_model, tmp_path, capsys):
    img = _good(tmp_path / "scan.nii.gz")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    rc, err = _run(tiny_model, img, blocker / "seg.nii.gz", capsys)
    assert rc != 0 and "cannot write" in err
    assert blocker.read_text() == "a file where a folder should be"


def test_no_model_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(tmp_path / "none"))
    from SynthSegMONAILib import model_registry

    monkeypatch.setattr(model_registry, "shipped_model_dir", lambda: tmp_path / "shipped")
    rc = main(["--i", str(_good(tmp_path / "scan.nii.gz")), "--o", str(tmp_path / "seg.nii.gz")])
    err = capsys.readouterr().err
    assert rc != 0 and "import-keras" in err and "--model" in err
