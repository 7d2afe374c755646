"""Training runs on CPU: the loss goes down, models are exported, bad inputs give clear errors."""

from __future__ import annotations

import json

import pytest
import yaml
from training_fixtures import REPO, needs_maps, subset_maps, tiny_args

from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import load_model
from SynthSegMONAITrainingLib.cli import main
from SynthSegMONAITrainingLib.config import Config, load_config

MAPS = ["training_seg_01.nii.gz", "training_seg_02.nii.gz", "training_seg_03.nii.gz", "training_seg_16.nii.gz"]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    return subset_maps(tmp_path_factory.mktemp("data"), MAPS)


@pytest.fixture(scope="module")
def trained(maps, tmp_path_factory):
    """One tiny single-process run shared by the tests below."""
    out = tmp_path_factory.mktemp("run")
    code = main(tiny_args(maps, out, 60, validate_every="30", checkpoint_every="30")
                + ["--set", "training.log_every=10"])
    assert code == 0
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@needs_maps
def test_single_process_run_lowers_the_loss(trained):
    losses = [r["loss"] for r in _rows(trained) if "loss" in r]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < losses[0]
    for name in ("checkpoint.pt", "config.yaml", "metrics.csv", "snapshot.png", "summary.json"):
        assert (trained / name).is_file(), name


@pytest.mark.slow
@needs_maps
def test_exported_models_load_in_the_engine(trained):
    summary = json.loads((trained / "summary.json").read_text())
    for name in ("best.safetensors", "last.safetensors"):
        model, info = load_model(trained / name)
        assert info.labels == synthseg_labels("1.0")
        assert info.synthseg_version == "1.0"
        assert info.network.levels == 3 and info.network.features == 8
        assert info.provenance["config"]["synthesis"]["crop_size"] == [32, 32, 32]
    _, last = load_model(trained / "last.safetensors")
    assert last.provenance["steps"] == 60
    val = [r for r in _rows(trained) if "val_mean_dice" in r]
    assert [r["step"] for r in val] == [30, 60]
    assert summary["best_step"] in (30, 60)
    assert summary["best_mean_dice"] == max(r["val_mean_dice"] for r in val)
    # the validation map is held out from training
    assert summary["validation_maps"] == [MAPS[-1]]
    assert MAPS[-1] not in summary["label_maps_per_rank"][0]


def test_default_config_is_synthseg_1_training():
    cfg = Config()
    assert cfg.synthesis.crop_size == [160, 160, 160]
    assert cfg.training.batch_size == 1 and cfg.optim.optimizer == "adam" and cfg.optim.lr == 1e-4
    assert cfg.synthesis.rotation_bounds == 15 and cfg.synthesis.scaling_bounds == 0.2
    assert cfg.synthesis.nonlin_std == 4 and cfg.synthesis.bias_field_std == 0.7
    assert cfg.training.steps == 505_000 and cfg.training.l2_warmup_steps == 5_000
    shipped = load_config(REPO / "SynthSegMONAITraining" / "configs" / "synthseg_1.0.yaml")
    assert shipped.to_dict() == {**Config().to_dict(), "data": shipped.to_dict()["data"]}


def test_json_config_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 0.01, "schedule": "cosine", "warmup_steps": 10}}))
    cfg = load_config(path, ["synthesis.crop_size=[64, 64, 64]", "training.synthseg_version='2.0'"])
    assert cfg.optim.lr == 0.01 and cfg.optim.schedule == "cosine"
    assert cfg.synthesis.crop_size == [64, 64, 64] and cfg.training.synthseg_version == "2.0"


@pytest.mark.parametrize("content, message", [
    ("optim: {lr: -1}", "lr must be positive"),
    ("synthesis: {crop_sise: [32, 32, 32]}", "unknown setting.*crop_sise"),
    ("training: {steps: many}", "training.steps: expected an integer"),
    ("training: [1, 2", "not valid YAML"),
    ("network: {levels: 0}", "network"),
])
def test_bad_config_exits_with_message(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["--config", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "bad configuration" in err
    import re

    assert re.search(message, err), err


def test_missing_config_file(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"), ("empty", "no label maps"), ("corrupt", "cannot read"),
    ("too_few", "need more than"),
])
def test_bad_label_map_folders(tmp_path, capsys, case, message):
    folder = tmp_path / "maps"
    if case != "missing":
        folder.mkdir()
    if case == "corrupt":
        (folder / "a.nii.gz").write_bytes(b"garbage")
        (folder / "b.nii.gz").write_bytes(b"garbage")
    if case == "too_few":
        (folder / "a.nii.gz").symlink_to(REPO.parent / "shared" / "data" / "training_label_maps" / MAPS[0])
    code = main(tiny_args(folder, tmp_path / "out", 2))
    assert code == 1
    assert message in capsys.readouterr().err


@needs_maps
def test_resume_needs_a_checkpoint_and_runs_are_not_overwritten(maps, trained, tmp_path, capsys):
    assert main(tiny_args(maps, tmp_path / "fresh", 2) + ["--resume"]) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(tiny_args(maps, trained, 2)) == 1
    assert "already holds a training run" in capsys.readouterr().err


@needs_maps
def test_crop_must_fit_the_network(maps, tmp_path, capsys):
    assert main(tiny_args(maps, tmp_path / "o", 2) + ["--crop-size", "30"]) == 1
    assert "multiples of 4" in capsys.readouterr().err


def test_print_config(capsys, tmp_path):
    assert main(["--output-dir", str(tmp_path), "--print-config", "--steps", "7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["training"]["steps"] == 7


def _engine_cli():
    import shutil
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "synthseg-monai"
    return str(exe) if exe.is_file() else shutil.which("synthseg-monai")


@pytest.mark.slow
@needs_maps
def test_export_then_segment_with_the_engine(trained, tmp_path):
    import subprocess

    import nibabel as nib
    import numpy as np
    from training_fixtures import LABEL_MAPS

    from SynthSegMONAITrainingLib.config import SynthesisConfig
    from SynthSegMONAITrainingLib.label_maps import load_generation_table, load_label_map
    from SynthSegMONAITrainingLib.synthesis import Synthesizer

    exe = _engine_cli()
    if exe is None:
        pytest.skip("the synthseg-monai command is not installed")
    table = load_generation_table("1.0")
    lm = load_label_map(LABEL_MAPS / MAPS[-1], table, downsample=4)
    image, _, _ = Synthesizer(SynthesisConfig(crop_size=[32, 32, 32]), table).sample([lm], 0)
    img_path, seg_path = tmp_path / "synthetic.nii.gz", tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(image[0].numpy() * 200, np.diag([2.0, 2.0, 2.0, 1.0])), str(img_path))
    result = subprocess.run([exe, "--i", str(img_path), "--o", str(seg_path), "--model",
                             str(trained / "last.safetensors"), "--cpu"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    seg = nib.load(str(seg_path))
    values = set(np.unique(np.asarray(seg.dataobj)).astype(int).tolist())
    assert values <= set(synthseg_labels("1.0"))
    extent = np.array(seg.shape) * np.array(seg.header.get_zooms()[:3])
    assert np.allclose(extent, 64, atol=2)  # same field of view as the 32^3 x 2 mm input


def test_engine_cli_dispatches_train(tmp_path):
    import subprocess

    exe = _engine_cli()
    if exe is None:
        pytest.skip("the synthseg-monai command is not installed")
    result = subprocess.run([exe, "train", "--output-dir", str(tmp_path), "--print-config", "--steps", "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["training"]["steps"] == 3
