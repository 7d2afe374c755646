"""train_round.py: a time-bounded round runs end to end on the CPU, returns its model in parts that
join into a working model, starts from a given model's weights, and survives being killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from training_fixtures import REPO, needs_maps, subset_maps

from SynthSegMONAILib.cli import main as segment_main
from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import load_model
from SynthSegMONAITrainingLib.label_cache import load_label_cache
from SynthSegMONAITrainingLib.label_maps import LabelMapError, load_generation_table, load_label_map
from SynthSegMONAITrainingLib.model_parts import PART_BYTES, join_parts, part_paths, write_parts
from SynthSegMONAITrainingLib.training_round import lr_at

ROUND_SCRIPT = REPO / "SynthSegMONAITraining" / "train_round.py"
CACHE_SCRIPT = REPO / "SynthSegMONAITraining" / "make_label_cache.py"
SAMPLE = REPO / "Testing" / "Data" / "sample_t1_colin27.nii.gz"
MAPS = ["training_seg_01.nii.gz", "training_seg_02.nii.gz", "training_seg_20.nii.gz"]
ROUND_FIELDS = ("device", "steps", "samples", "samples_per_s", "median_step_s", "synthesis_share", "compile",
                "lr_schedule", "final_training_loss", "validation", "batch_size", "model_parts")


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A label-map cache of three training maps, made with the documented command."""
    tmp = tmp_path_factory.mktemp("cache")
    maps = subset_maps(tmp, MAPS)
    out = tmp / "label_maps.npz"
    r = subprocess.run([sys.executable, str(CACHE_SCRIPT), str(maps), "-o", str(out)], capture_output=True,
                       text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr
    assert "3 maps" in r.stdout
    return out


@pytest.fixture(scope="module")
def finished_round(cache, tmp_path_factory) -> Path:
    """The round the issue names: 60 s, 64^3 crops, from random weights, full SynthSeg U-Net."""
    out = tmp_path_factory.mktemp("round")
    r = subprocess.run([sys.executable, str(ROUND_SCRIPT), "--time-budget", "60", "--crop-size", "64",
                        "--init", "none", "--label-maps", str(cache), "--output-dir", str(out), "--device", "cpu",
                        "--log-every", "2", "--validation-maps", "1", "--validation-samples", "1"],
                       capture_output=True, text=True, timeout=240, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@needs_maps
def test_label_cache_holds_the_maps_as_training_reads_them(cache):
    table = load_generation_table("2.0")
    cached = load_label_cache(cache, table)
    assert [m.name for m in cached] == MAPS
    for m in cached[:2]:
        direct = load_label_map(Path(os.path.realpath(cache.parent / "maps" / m.name)), table)
        assert m.voxel_size == direct.voxel_size
        assert m.indices.dtype == torch.uint8 and torch.equal(m.indices, direct.indices)
    assert cache.stat().st_size < 3 * 2**20  # three cropped, compressed maps


@needs_maps
def test_label_cache_refuses_other_files(cache, tmp_path):
    table = load_generation_table("2.0")
    not_cache = tmp_path / "other.npz"
    np.savez_compressed(not_cache, data=np.zeros(3))
    with pytest.raises(LabelMapError, match="not a label-map cache"):
        load_label_cache(not_cache, table)
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.raises(LabelMapError, match="cannot read label-map cache"):
        load_label_cache(damaged, table)


def test_parts_join_back_and_stale_parts_go(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 2500, dtype=np.uint8).tobytes()
    src = tmp_path / "blob"
    src.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.part5").write_bytes(b"unrelated")  # not contiguous with the parts: left alone
    written = write_parts(src, out, "m", part_bytes=1000)
    assert [w["bytes"] for w in written] == [1000, 1000, 500]
    assert join_parts(out, "m", tmp_path / "joined").read_bytes() == data
    src.write_bytes(data[:1500])
    write_parts(src, out, "m", part_bytes=1000)
    assert [p.name for p in part_paths(out, "m")] == ["m.part0", "m.part1"]
    assert join_parts(out, "m", tmp_path / "joined").read_bytes() == data[:1500]


def test_learning_rate_warms_up_then_decays_to_the_end_of_the_budget():
    lrs = [lr_at(f, 1e-3, 0.1, 0.02) for f in np.linspace(0, 1, 101)]
    peak = int(np.argmax(lrs))
    assert 8 <= peak <= 11 and lrs[peak] == pytest.approx(1e-3, rel=0.02)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(2e-5)


@pytest.mark.slow
@needs_maps
def test_a_one_minute_round_returns_a_model_in_parts_and_its_record(finished_round, tmp_path):
    files = sorted(p.name for p in finished_round.iterdir())
    assert files == ["metrics.csv", "model.safetensors.part0", "model.safetensors.part1", "round.json",
                     "snapshot.png"]
    for p in part_paths(finished_round, "model.safetensors"):
        assert p.stat().st_size <= PART_BYTES
    record = json.loads((finished_round / "round.json").read_text())
    for key in ROUND_FIELDS:
        assert key in record, key
    assert record["status"] == "finished" and record["steps"] >= 1
    assert record["seconds"] <= 62  # the budget, up to the final checkpoint's timing jitter
    assert record["compile"]["used"] is False
    assert 0 <= record["synthesis_share"] <= 1 and record["samples_per_s"] > 0
    assert 0 <= record["validation"]["mean_dice"] <= 1
    model_file = join_parts(finished_round, "model.safetensors", tmp_path / "model.safetensors")
    model, info = load_model(model_file)
    assert info.labels == synthseg_labels("2.0") and info.network.features == 24
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    assert info.provenance["rounds"][-1]["steps"] == record["steps"]
    assert model_file.stat().st_size < 28e6  # float16: about 26 MB

    # the joined model segments the sample scan through the command line
    seg = tmp_path / "seg.nii.gz"
    assert segment_main(["--i", str(SAMPLE), "--o", str(seg), "--model", str(model_file), "--fast",
                         "--crop", "96", "--cpu", "--threads", "2"]) == 0
    out = nib.load(str(seg))
    assert out.shape == nib.load(str(SAMPLE)).shape  # SynthSeg puts a cropped result back in the full grid
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= set(synthseg_labels("2.0"))


def _start_round(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROUND_SCRIPT), *args], stderr=subprocess.PIPE, text=True,
                            env=_env())


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    seen, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"no '{text}' line; the round said:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
@needs_maps
def test_a_warm_start_begins_from_the_init_weights_and_a_killed_round_keeps_its_checkpoint(
        finished_round, cache, tmp_path):
    init = join_parts(finished_round, "model.safetensors", tmp_path / "init.safetensors")
    out = tmp_path / "warm"
    proc = _start_round(["--time-budget", "300", "--crop-size", "64", "--init", str(init), "--label-maps",
                         str(cache), "--output-dir", str(out), "--device", "cpu", "--log-every", "1",
                         "--checkpoint-every", "1", "--validation-maps", "1", "--validation-samples", "1"])
    try:
        _wait_for(proc, "checks passed")
        # the check-time export, before any step, is the init model (float16 both ways)
        check = join_parts(out, "model.safetensors", tmp_path / "check.safetensors")
        m0, _ = load_model(init)
        m1, info1 = load_model(check)
        s0, s1 = m0.state_dict(), m1.state_dict()
        for k in s0:
            if s0[k].is_floating_point():
                assert torch.equal(s0[k], s1[k]), k
        assert info1.provenance["init"] == "init.safetensors"
        assert len(info1.provenance["rounds"]) == 2  # the first round, then this one

        _wait_for(proc, "checkpoint at step")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    killed = join_parts(out, "model.safetensors", tmp_path / "killed.safetensors")
    model, info = load_model(killed)
    assert info.provenance["rounds"][-1]["steps"] >= 1
    record = json.loads((out / "round.json").read_text())
    assert record["status"] == "running" and record["steps"] == info.provenance["rounds"][-1]["steps"]
    changed = any(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), model.state_dict().values()))
    assert changed


@needs_maps
def test_a_round_without_label_maps_or_with_a_bad_init_stops_at_once(cache, tmp_path):
    r = subprocess.run([sys.executable, str(ROUND_SCRIPT), "--time-budget", "60", "--output-dir",
                        str(tmp_path / "a")], capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in _env().items() if k != "SYNTHSEG_MONAI_LABEL_MAPS"})
    assert r.returncode == 2 and "no label maps" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    t = time.monotonic()
    r = subprocess.run([sys.executable, str(ROUND_SCRIPT), "--time-budget", "60", "--output-dir",
                        str(tmp_path / "b"), "--label-maps", str(cache), "--init", str(bad), "--device", "cpu"],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1 and "not a SynthSeg-MONAI model file" in r.stderr
    assert time.monotonic() - t < 30


def test_make_label_cache_refuses_a_folder_without_maps(tmp_path):
    r = subprocess.run([sys.executable, str(CACHE_SCRIPT), str(tmp_path), "-o", str(tmp_path / "c.npz")],
                       capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode == 1 and "no label maps" in r.stderr
    assert not (tmp_path / "c.npz").exists()


def test_default_start_is_the_shipped_model_else_random_weights(tmp_path, monkeypatch):
    from SynthSegMONAITrainingLib import training_round

    shipped = tmp_path / "Models"
    shipped.mkdir()
    monkeypatch.setattr(training_round, "shipped_model_dir", lambda: shipped)
    assert training_round.default_init_model() is None
    (shipped / "synthseg_monai_default.safetensors").write_bytes(b"x")
    assert training_round.default_init_model() == shipped / "synthseg_monai_default.safetensors"
