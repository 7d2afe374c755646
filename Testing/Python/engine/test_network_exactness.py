"""The imported network reproduces the original Keras network's raw softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SynthSegMONAILib.inference import SlabNetwork
from SynthSegMONAILib.keras_import import load_keras_model
from SynthSegMONAILib.model_file import load_model
from SynthSegMONAILib.network import count_parameters

# float32 round-off of these random networks: see the keras-synthseg README
SOFTMAX_TOLERANCE = 2e-4


@pytest.mark.parametrize("version,inputs", [("2.0", "t1crop64"), ("2.0", "noise32x64x96"),
                                            ("1.0", "t1crop64"), ("1.0", "noise32x64x96")])
def test_imported_network_matches_keras_softmax(keras_ref, imported_models, version, inputs):
    ref = np.load(keras_ref / "raw" / f"raw_{version}_{inputs}.npz")
    model, info = load_model(imported_models[version])
    x = torch.from_numpy(ref["input"])
    with torch.no_grad():
        whole = torch.softmax(model(x[None, None]), 1)[0].permute(1, 2, 3, 0).numpy()
    slabs = SlabNetwork(model, slab_budget_mb=1).posteriors(x, sigma=None).permute(1, 2, 3, 0).numpy()
    for out in (whole, slabs):
        assert np.abs(out - ref["softmax"]).max() < SOFTMAX_TOLERANCE
        assert (out.argmax(-1) == ref["softmax"].argmax(-1)).mean() > 0.9999
    assert len(info.labels) == (33 if version == "2.0" else 32)


def test_parameter_counts_match_keras(keras_ref):
    for version, expected in (("2.0", 13_242_849), ("1.0", 13_242_824)):
        model, _ = load_keras_model(keras_ref / f"synthseg_{version}_random.h5")
        assert count_parameters(model) == expected


def test_debug_taps_first_conv_and_bottleneck(keras_ref):
    taps = np.load(keras_ref / "raw" / "raw_2.0_t1crop64_layers.npz")
    ref = np.load(keras_ref / "raw" / "raw_2.0_t1crop64.npz")
    model, _ = load_keras_model(keras_ref / "synthseg_2.0_random.h5")
    x = torch.from_numpy(ref["input"])[None, None]
    with torch.no_grad():
        first = model.encoder[0].convs[0](x)[0].permute(1, 2, 3, 0).numpy()
        h = x
        for i, level in enumerate(model.encoder):
            h = level.bn(level.features(h))
            if i < len(model.encoder) - 1:
                h = torch.nn.functional.max_pool3d(h, 2)
    o = taps["unet_conv_downarm_0_0_offset"]
    block = first[o[0]:o[0] + 16, o[1]:o[1] + 16, o[2]:o[2] + 16]
    assert np.abs(block - taps["unet_conv_downarm_0_0"]).max() < 1e-5
    assert np.abs(h[0].permute(1, 2, 3, 0).numpy() - taps["unet_bn_down_4"]).max() < 1e-3
