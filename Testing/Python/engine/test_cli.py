"""The command line beyond SynthSeg's own runs: NRRD in and out, the input's grid, progress
lines for a parent process, model import and listing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import load_model
from SynthSegMONAILib.progress import PROGRESS_PREFIX, RESULT_PREFIX, parse_line

LABELS = synthseg_labels("2.0")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _head(shape=(24, 26, 22)) -> np.ndarray:
    g = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) / 2)[:, None, None, None]
    r = np.sqrt((((g - centre) / centre) ** 2).sum(0))
    rng = np.random.default_rng(0)
    return (np.where(r < 0.9, 80.0, 5.0) + np.where(r < 0.5, 40.0, 0.0) + rng.normal(0, 2, shape)).astype(np.float32)


def _segment(tiny_model, inp: Path, out: Path, *extra: str) -> int:
    return main(["--i", str(inp), "--o", str(out), "--model", str(tiny_model), "--threads", "2", *extra])


def test_nrrd_input_and_outputs_match_the_nifti_run(tiny_model, tmp_path):
    data = _head()
    spacing, origin = np.array([1.0, 1.0, 1.0]), np.array([-12.0, 30.0, -8.0])
    lps_dirs = np.diag(spacing)
    nrrd.write(str(tmp_path / "t1.nrrd"), data, {"space": "left-posterior-superior",
                                                  "space directions": lps_dirs, "space origin": origin},
               index_order="F")
    # the same image as NIfTI: RAS = diag(-1, -1, 1) LPS
    ras = np.eye(4)
    ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ lps_dirs
    ras[:3, 3] = origin * [-1, -1, 1]
    nib.save(nib.Nifti1Image(data, ras), str(tmp_path / "t1.nii.gz"))

    assert _segment(tiny_model, tmp_path / "t1.nrrd", tmp_path / "seg.nrrd", "--post", str(tmp_path / "post.nrrd")) == 0
    assert _segment(tiny_model, tmp_path / "t1.nii.gz", tmp_path / "seg.nii.gz") == 0
    seg, header = nrrd.read(str(tmp_path / "seg.nrrd"), index_order="F")
    reference = nib.load(tmp_path / "seg.nii.gz")
    assert np.array_equal(seg, np.asarray(reference.dataobj))
    assert header["space"] == "left-posterior-superior"
    lps_from_nifti = np.diag([-1.0, -1.0, 1.0, 1.0]) @ reference.affine
    assert np.allclose(np.asarray(header["space directions"]), lps_from_nifti[:3, :3].T)
    assert np.allclose(header["space origin"], lps_from_nifti[:3, 3])
    assert set(np.unique(seg)) <= set(LABELS)

    post, post_header = nrrd.read(str(tmp_path / "post.nrrd"), index_order="F")
    assert post.shape == (*seg.shape, len(LABELS))
    assert post_header["kinds"][-1] == "vector"
    assert np.allclose(post.sum(-1), 1.0, atol=1e-4)
    assert np.array_equal(np.asarray(LABELS)[post.argmax(-1)], seg)


def test_output_on_the_input_grid(tiny_model, tmp_path):
    data = _head((24, 26, 9))
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    affine[:3, 3] = [5.0, -7.0, 2.0]
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "thick.nii.gz"))

    assert _segment(tiny_model, tmp_path / "thick.nii.gz", tmp_path / "seg_1mm.nii.gz") == 0
    one_mm = nib.load(tmp_path / "seg_1mm.nii.gz")
    assert np.allclose(one_mm.header.get_zooms(), 1.0)  # SynthSeg's grid by default

    assert _segment(tiny_model, tmp_path / "thick.nii.gz", tmp_path / "seg.nii.gz",
                    "--output-grid", "input", "--post", str(tmp_path / "post.nii.gz")) == 0
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == data.shape
    assert np.allclose(seg.affine, affine)
    post = np.asarray(nib.load(tmp_path / "post.nii.gz").dataobj)
    assert post.shape == (*data.shape, len(LABELS))
    assert np.array_equal(np.asarray(LABELS)[post.argmax(-1)], np.asarray(seg.dataobj))


def test_progress_lines_for_a_folder(tiny_model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(_head(), np.eye(4)), str(folder / f"{name}.nii.gz"))
    assert _segment(tiny_model, folder, tmp_path / "out", "--progress-lines") == 0
    parsed = [parse_line(line) for line in capsys.readouterr().out.splitlines()]
    progress = [p for kind, p in filter(None, parsed) if kind == PROGRESS_PREFIX]
    results = [p for kind, p in filter(None, parsed) if kind == RESULT_PREFIX]
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {p["image"] for p in progress} == {1, 2} and all(p["images"] == 2 for p in progress)
    assert any(p["stage"] == "network" for p in progress)
    assert [Path(r["segmentation"]).name for r in results] == ["a_synthseg.nii.gz", "b_synthseg.nii.gz"]
    assert all(Path(r["segmentation"]).is_file() and r["seconds"] > 0 for r in results)


def test_result_line_carries_the_files_written_and_the_volumes_of_the_csv(tiny_model, tmp_path, capsys):
    import csv

    from SynthSegMONAILib.protocol import ResultLine

    nib.save(nib.Nifti1Image(_head(), np.eye(4)), str(tmp_path / "t1.nii.gz"))
    assert _segment(tiny_model, tmp_path / "t1.nii.gz", tmp_path / "seg.nii.gz", "--progress-lines",
                    "--post", str(tmp_path / "post.nii.gz"), "--vol", str(tmp_path / "vol.csv")) == 0
    (line,) = [ResultLine.from_payload(p) for kind, p in filter(None, map(parse_line, capsys.readouterr()
                                                                          .out.splitlines())) if kind == RESULT_PREFIX]
    assert (line.segmentation, line.posteriors) == (str(tmp_path / "seg.nii.gz"), str(tmp_path / "post.nii.gz"))
    assert line.resampled is None  # already at 1 mm
    seg = np.asarray(nib.load(line.segmentation).dataobj)
    assert line.empty == (not seg.any())
    assert line.labels_present == [int(v) for v in np.unique(seg) if v != 0]
    with open(tmp_path / "vol.csv", newline="") as f:
        header, row = list(csv.reader(f))
    assert line.labels == LABELS[1:]
    assert [line.total_intracranial_mm3, *line.volumes_mm3] == [float(v) for v in row[1:]]
    assert header[1] == "total intracranial"


def test_importing_the_engine_package_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, SynthSegMONAILib as e; e.synthseg_labels(); e.available_models(); e.ResultLine; "
            "assert 'torch' not in sys.modules; e.Segmenter; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_is_a_subcommand_the_training_package_registers(capsys):
    from SynthSegMONAILib.cli import registered_subcommands

    registered = registered_subcommands()
    if "train" not in registered:
        pytest.skip("the package's entry points are not installed (pip install -e .)")
    assert registered["train"].module.startswith("SynthSegMONAITrainingLib")
    assert main(["--help"]) == 0
    assert "export-bundle, train;" in capsys.readouterr().out


def test_import_keras_command_writes_a_loadable_model(keras_ref, imported_models, tmp_path, capsys):
    out = tmp_path / "synthseg_2.0.safetensors"
    assert main(["import-keras", str(keras_ref / "synthseg_2.0_random.h5"), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model, info = load_model(out)
    reference, _ = load_model(imported_models["2.0"])
    assert info.labels == LABELS
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert main(["import-keras", str(tmp_path / "missing.h5"), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_models_lists_installed_models(tiny_model, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(tiny_model.read_bytes())
    (folder / "broken.safetensors").write_bytes(b"not a model")
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(folder))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert str(folder) in out.splitlines()[0]
    mine = next(line for line in out.splitlines() if line.startswith("mine\t"))
    assert f"{len(LABELS)} labels" in mine
    assert any(line.startswith("broken\tINVALID") for line in out.splitlines())


def test_slab_memory_defaults_to_256_mb_on_the_cpu(tiny_model):
    from SynthSegMONAILib.pipeline import Segmenter

    assert Segmenter(tiny_model, device="cpu").network.budget == 256 * 2**20
    assert Segmenter(tiny_model, device="cpu", slab_budget_mb=64).network.budget == 64 * 2**20
