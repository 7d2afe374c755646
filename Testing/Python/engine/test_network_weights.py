"""Segmenting reads a model file's tensors without building the network (or importing MONAI),
with the same result as the built network."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DEFAULT_MODEL, REPO, random_unet

from SynthSegMONAILib.inference import SlabNetwork
from SynthSegMONAILib.model_file import load_model, load_weights
from SynthSegMONAILib.network import UNetConfig
from SynthSegMONAILib.network_weights import UNetWeights


def test_weights_from_state_dict_give_the_networks_posteriors_bit_for_bit():
    model = random_unet(UNetConfig(levels=3, features=4, out_channels=5), seed=3)
    weights = UNetWeights.from_state_dict(model.config, model.state_dict())
    x = torch.randn(20, 24, 16)
    flip = np.array([0, 2, 1, 4, 3])
    from_module = SlabNetwork(model, slab_budget_mb=0).posteriors(x, 0.5, flip)
    from_tensors = SlabNetwork(weights, slab_budget_mb=0).posteriors(x, 0.5, flip)
    assert torch.equal(from_module, from_tensors)
    # and both are the network's own forward pass (softmax, unsmoothed, no flip) up to round-off
    with torch.no_grad():
        direct = torch.softmax(model(x[None, None]), 1)[0]
    streamed = SlabNetwork(weights, slab_budget_mb=0).posteriors(x, None, None)
    assert torch.allclose(direct, streamed, atol=1e-5)


def test_batchnorm_weights_normalise_as_torch_batchnorm():
    model = random_unet(UNetConfig(levels=3, features=4, out_channels=5), seed=3)
    bn = model.encoder[1].bn
    x = torch.randn(2, bn.num_features, 3, 4, 5)
    assert torch.equal(UNetWeights.from_module(model).encoder[1].bn(x), bn(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchnorm_into_a_buffer_equals_batchnorm_bit_for_bit(dtype):
    """In place, into rows of a channels-last buffer, and into a buffer laid out otherwise (where
    the kernel cannot write straight into it)."""
    model = random_unet(UNetConfig(levels=3, features=6, out_channels=5), seed=3)
    bn = UNetWeights.from_module(model).encoder[1].bn
    cl = torch.channels_last_3d
    x = (3 * torch.randn(1, bn.weight.numel(), 5, 8, 10)).to(dtype).contiguous(memory_format=cl)
    expected = bn(x)
    same = x.clone()
    assert bn.into(same, same) is same and torch.equal(same, expected)
    buffer = torch.zeros(1, x.shape[1], 12, 8, 10, dtype=dtype).contiguous(memory_format=cl)
    bn.into(x, buffer[:, :, 4:9])
    assert torch.equal(buffer[:, :, 4:9], expected)
    assert not buffer[:, :, :4].any() and not buffer[:, :, 9:].any()
    plain = torch.zeros(1, x.shape[1], 12, 8, 10, dtype=dtype)
    bn.into(x.contiguous(), buffer[:, :, 4:9])  # input laid out otherwise than the buffer
    bn.into(x, plain[:, :, 4:9])  # and the reverse
    assert torch.equal(buffer[:, :, 4:9], expected) and torch.equal(plain[:, :, 4:9], expected)


def test_load_weights_matches_load_model_on_the_default_model():
    weights, info = load_weights(DEFAULT_MODEL)
    model, info_model = load_model(DEFAULT_MODEL)
    assert info.labels == info_model.labels and weights.config == model.config
    state = model.state_dict()
    for i, level in enumerate(weights.encoder):
        assert torch.equal(level.convs[1].weight, state[f"encoder.{i}.convs.1.conv.weight"])
        assert torch.equal(level.bn.running_var, state[f"encoder.{i}.bn.running_var"])
    assert torch.equal(weights.head.bias, state["head.bias"])
    assert weights.head.weight.dtype == torch.float32  # the float16 file is computed in float32


def test_segmenting_does_not_import_monai(tmp_path):
    """MONAI's import (1.8-1.9 s and 130 MB, measured) is paid only by training and bundle export."""
    image = tmp_path / "head.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(0, 100, (40, 44, 36)).astype(np.float32), np.eye(4)), image)
    code = textwrap.dedent(f"""
        import sys
        from SynthSegMONAILib.cli import main
        rc = main(["--i", {str(image)!r}, "--o", {str(tmp_path / "seg.nii.gz")!r}, "--fast",
                   "--threads", "1"])
        assert rc == 0, rc
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "monai")
        print("MONAI modules:", loaded[:5])
        sys.exit(3 if loaded else 0)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO / "SynthSegMONAI", timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "seg.nii.gz").is_file()
