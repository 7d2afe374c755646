"""A new user's first runs: no file is ever destroyed, outputs are readable by the group, models
are found by name, multi-channel images follow SynthSeg, and the messages say what happened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_model
from training_fixtures import needs_maps, subset_maps, tiny_args

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.progress import Progress


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _scan(path: Path, channels: int = 0, zooms=(1.0, 1.0, 1.0)) -> Path:
    rng = np.random.default_rng(len(str(path)))
    shape = (26, 28, 24) + ((channels,) if channels else ())
    data = rng.uniform(0, 100, shape).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    img.header.set_zooms(tuple(zooms) + ((1.0,) if channels else ()))
    nib.save(img, str(path))
    return path


def _segment(model: Path, *args: str) -> int:
    return main([*args, "--model", str(model), "--threads", "2"])


# -- no run destroys a file ----------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["same path", "symbolic link", "relative path", "dot slash"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(tiny_model, tmp_path, monkeypatch, capsys,
                                                                spelling):
    scan = _scan(tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    monkeypatch.chdir(tmp_path)
    out = {"same path": str(scan), "relative path": "scan.nii.gz", "dot slash": "./scan.nii.gz"}.get(spelling)
    if spelling == "symbolic link":
        (tmp_path / "link.nii.gz").symlink_to(scan)
        out = str(tmp_path / "link.nii.gz")
    assert _segment(tiny_model, "--i", str(scan), "--o", out) == 1
    err = capsys.readouterr().err
    assert "is the input image" in err and "refusing to overwrite" in err
    assert scan.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "link.nii.gz") == ["scan.nii.gz"]


@pytest.mark.parametrize("option", ["--post", "--resample", "--vol"])
def test_posteriors_resampled_or_volumes_onto_the_input_are_refused(tiny_model, tmp_path, capsys, option):
    scan = _scan(tmp_path / "scan.nii.gz")
    before = scan.read_bytes()
    target = str(scan) if option != "--vol" else str(tmp_path / "scan.nii.gz")
    rc = _segment(tiny_model, "--i", str(scan), "--o", str(tmp_path / "seg.nii.gz"), option, target)
    if option == "--vol":  # --vol appends .csv to a name without it: another file, allowed
        assert rc == 0
    else:
        assert rc == 1 and "refusing to overwrite" in capsys.readouterr().err
    assert scan.read_bytes() == before


def test_two_outputs_that_are_one_file_are_refused(tiny_model, tmp_path, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "out.nii.gz"
    assert _segment(tiny_model, "--i", str(scan), "--o", str(out), "--post", str(out)) == 1
    assert "--o and --post name the same file" in capsys.readouterr().err
    assert not out.exists()


def test_folder_mode_checks_each_image_and_goes_on(tiny_model, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    _scan(folder / "a.nii.gz")
    # b's segmentation name is a symbolic link to b itself: b must stay, a is still segmented
    b = _scan(folder / "b.nii.gz")
    before = b.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "b_synthseg.nii.gz").symlink_to(b)
    assert _segment(tiny_model, "--i", str(folder), "--o", str(out)) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert b.read_bytes() == before
    assert (out / "a_synthseg.nii.gz").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(tiny_model, tmp_path, umask):
    scan = _scan(tmp_path / "scan.nii.gz", zooms=(1.3, 1.3, 1.3))
    old = os.umask(umask)
    try:
        assert _segment(tiny_model, "--i", str(scan), "--o", str(tmp_path / "seg.nii.gz"), "--post",
                        str(tmp_path / "post.nii.gz"), "--resample", str(tmp_path / "res.nii.gz"), "--vol",
                        str(tmp_path / "vol.csv")) == 0
        model = make_tiny_model(tmp_path / "model.safetensors")
    finally:
        os.umask(old)
    for name in ("seg.nii.gz", "post.nii.gz", "res.nii.gz", "vol.csv", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert model.is_file()


# -- models found by name ------------------------------------------------------------------
def test_model_by_installed_name_with_or_without_suffix(tiny_model, tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "mymodel.safetensors").write_bytes(tiny_model.read_bytes())
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(models))
    monkeypatch.chdir(tmp_path)  # no mymodel.safetensors here: the name must come from the model folder
    scan = _scan(tmp_path / "scan.nii.gz")
    for name in ("mymodel", "mymodel.safetensors"):
        assert main(["--i", str(scan), "--o", str(tmp_path / f"{name}.seg.nii.gz"), "--model", name]) == 0
    assert main(["--i", str(scan), "--o", str(tmp_path / "x.nii.gz"), "--model", "other"]) == 1
    err = capsys.readouterr().err
    assert "neither a file nor an installed model" in err and "Installed models: mymodel" in err
    assert "import-keras" in err


def test_a_keras_file_as_model_says_to_convert_it(tmp_path, capsys):
    h5 = tmp_path / "synthseg_2.0.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    scan = _scan(tmp_path / "scan.nii.gz")
    assert main(["--i", str(scan), "--o", str(tmp_path / "s.nii.gz"), "--model", str(h5)]) == 1
    err = capsys.readouterr().err
    assert "is a Keras file: convert it once with" in err and "synthseg-monai import-keras" in err


def test_models_with_nothing_installed_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(tmp_path / "none"))
    monkeypatch.setattr("SynthSegMONAILib.model_registry.shipped_model_dir", lambda: tmp_path / "shipped")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "No model is installed" in out and "import-keras" in out


# -- SynthSeg's multi-channel rule -------------------------------------------------------------
def test_three_channel_image_is_segmented_on_its_first_channel_or_the_chosen_one(tiny_model, tmp_path, capsys):
    rgb = _scan(tmp_path / "rgb.nii.gz", channels=3)
    data = np.asarray(nib.load(str(rgb)).dataobj)

    def run(image: Path, name: str, *extra: str) -> np.ndarray:
        assert _segment(tiny_model, "--i", str(image), "--o", str(tmp_path / f"{name}.nii.gz"),
                        "--post", str(tmp_path / f"{name}_post.nii.gz"), *extra) == 0
        return np.asarray(nib.load(str(tmp_path / f"{name}_post.nii.gz")).dataobj)

    single = []
    for c in (0, 1):
        nib.save(nib.Nifti1Image(data[..., c], np.eye(4)), str(tmp_path / f"c{c}.nii.gz"))
        single.append(run(tmp_path / f"c{c}.nii.gz", f"s{c}"))
    capsys.readouterr()
    assert np.array_equal(run(rgb, "rgb0"), single[0])
    assert "has 3 channels: segmenting the first" in capsys.readouterr().err
    assert np.array_equal(run(rgb, "rgb1", "--channel", "1"), single[1])
    assert not np.array_equal(single[0], single[1])
    assert _segment(tiny_model, "--i", str(rgb), "--o", str(tmp_path / "bad.nii.gz"), "--channel", "3") == 1
    assert "--channel 3 does not exist (the image has 3 channels" in capsys.readouterr().err


# -- messages ------------------------------------------------------------------------------------
def test_help_lists_the_segmentation_flags_and_a_typo_is_named(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--i" in out and "--vol" in out and "--fast" in out
    assert main(["segmnt", "--i", "x"]) == 2
    assert "unknown subcommand 'segmnt'" in capsys.readouterr().err


def test_missing_input_is_reported_before_the_model_and_without_the_banner(tmp_path, capsys):
    rc = main(["--i", str(tmp_path / "nope.nii.gz"), "--o", str(tmp_path / "s.nii.gz"),
               "--model", str(tmp_path / "no-model.safetensors")])
    out, err = capsys.readouterr()
    assert rc == 1 and "nope.nii.gz: file not found" in err and "model" not in err
    assert "cite" not in out and "loading" not in out


def test_every_written_output_is_named_and_an_unwritten_resample_explained(tiny_model, tmp_path, capsys):
    scan = _scan(tmp_path / "scan.nii.gz")
    assert _segment(tiny_model, "--i", str(scan), "--o", str(tmp_path / "seg.nii.gz"), "--post",
                    str(tmp_path / "post.nii.gz"), "--resample", str(tmp_path / "res.nii.gz")) == 0
    out = capsys.readouterr().out
    assert f"segmentation saved in: {tmp_path / 'seg.nii.gz'}" in out
    assert f"posteriors saved in: {tmp_path / 'post.nii.gz'}" in out
    assert "resampled image not written: scan.nii.gz is already at 1 mm" in out
    assert not (tmp_path / "res.nii.gz").exists()


def test_an_empty_segmentation_is_warned_about(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "background.safetensors", background_bias=100.0)
    scan = _scan(tmp_path / "scan.nii.gz")
    assert _segment(model, "--i", str(scan), "--o", str(tmp_path / "seg.nii.gz")) == 0
    assert "the segmentation of scan.nii.gz is empty" in capsys.readouterr().err
    assert not np.asarray(nib.load(str(tmp_path / "seg.nii.gz")).dataobj).any()


def test_progress_bar_ends_at_100_percent_and_messages_get_their_own_line(capsys):
    progress = Progress(2, bar=True)
    progress.start_image(0)
    progress("network", 0.5)
    progress.message("segmentation saved in: somewhere")
    progress.start_image(1)
    progress("network", 0.3)  # the second image fails: the run still ends at 100 %
    progress.close()
    out, err = capsys.readouterr()
    assert out.startswith("segmentation saved in: somewhere\n")
    assert "100%" in err.split("\r")[-1]


# -- training messages ---------------------------------------------------------------------------
@pytest.mark.slow
@needs_maps
def test_training_says_where_its_models_are(tmp_path, capsys):
    from SynthSegMONAITrainingLib.cli import main as train_main

    maps = subset_maps(tmp_path, ["training_seg_01.nii.gz", "training_seg_02.nii.gz"])
    assert train_main(tiny_args(maps, tmp_path / "run", 4, validate_every="4", checkpoint_every="4")) == 0
    out = capsys.readouterr().out
    assert f"models saved in: {tmp_path / 'run' / 'best.safetensors'}" in out
    assert str(tmp_path / "run" / "last.safetensors") in out


def test_no_label_maps_says_where_to_get_synthseg_maps(tmp_path, capsys):
    from SynthSegMONAITrainingLib.cli import main as train_main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(["--label-maps", str(empty), "--output-dir", str(tmp_path / "run"), "--device", "cpu"]) == 1
    assert "github.com/BBillot/SynthSeg" in capsys.readouterr().err


def test_snapshot_loss_panel_shows_a_single_logged_point(tmp_path):
    import matplotlib.image

    from SynthSegMONAITrainingLib.snapshot import write_snapshot

    write_snapshot(tmp_path / "one.png", {}, [{"step": 10, "loss": 0.8}], 4)
    rgb = matplotlib.image.imread(str(tmp_path / "one.png"))[..., :3]
    curve_colour = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour
    assert (np.abs(rgb - curve_colour).max(-1) < 0.08).sum() > 10
