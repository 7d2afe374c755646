"""Multi-process training with torchrun (gloo on CPU) and exact resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import TRAIN_SCRIPT, needs_maps, run_train, subset_maps, tiny_args

from SynthSegMONAILib.model_file import load_model

MAPS = ["training_seg_01.nii.gz", "training_seg_02.nii.gz", "training_seg_03.nii.gz", "training_seg_16.nii.gz"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
            "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    return subset_maps(tmp_path_factory.mktemp("data"), MAPS)


@pytest.mark.slow
@needs_maps
def test_torchrun_two_processes_end_with_identical_weights(maps, tmp_path):
    out = tmp_path / "ddp"
    result = run_train(tiny_args(maps, out, 12, validate_every="12", checkpoint_every="6"), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["weights_sha256_per_rank"]
    assert len(sums) == 2 and sums[0] == sums[1]
    shares = summary["label_maps_per_rank"]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])  # disjoint shares
    assert MAPS[-1] not in shares[0] + shares[1]
    model, info = load_model(out / "last.safetensors")
    assert info.provenance["world_size"] == 2
    assert sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line) >= 2


@pytest.mark.slow
@needs_maps
def test_failing_rank_ends_the_run_with_an_error(maps, tmp_path):
    folder = tmp_path / "maps"
    folder.mkdir()
    for n in MAPS:
        (folder / n).symlink_to(maps / n)
    (folder / "training_seg_02.nii.gz").unlink()
    (folder / "training_seg_02.nii.gz").write_bytes(b"damaged")  # in rank 1's share
    t0 = time.perf_counter()
    result = run_train(tiny_args(folder, tmp_path / "out", 4) + ["--set", "distributed.timeout_s=60"],
                       launcher=TORCHRUN, timeout=120)
    assert result.returncode != 0
    assert "training_seg_02.nii.gz" in result.stderr and "cannot read" in result.stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "out" / "last.safetensors").exists()


def _tensors(path):
    return load_file(str(path))


@pytest.mark.slow
@needs_maps
def test_resume_after_kill_matches_uninterrupted_run(maps, tmp_path):
    steps = "16"
    common = dict(validate_every="8", checkpoint_every="4")
    full = run_train(tiny_args(maps, tmp_path / "full", int(steps), **common))
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    cmd = [sys.executable, str(TRAIN_SCRIPT)] + tiny_args(maps, out, int(steps), **common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(ckpt, weights_only=True)  # plain data: loads without unpickling objects
    assert 0 < state["step"] < int(steps)  # killed mid-training
    assert not (out / "last.safetensors").exists()

    resumed = run_train(tiny_args(maps, out, int(steps), **common) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _tensors(tmp_path / "full" / "last.safetensors"), _tensors(out / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 10, 15, 16]  # no duplicated steps after the kill
