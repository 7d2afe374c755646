"""Write random-weight stand-ins for SynthSeg 2.0's robust, parcellation and QC networks.

The files have the layout of the official ``synthseg_robust_2.0.h5``, ``synthseg_parc_2.0.h5``
and ``synthseg_qc_2.0.h5`` (Keras 2.15 ``save_weights``: root attributes ``backend``,
``keras_version``, ``layer_names``; one group per layer with a ``weight_names`` attribute;
datasets ``<layer>/<layer>/kernel:0`` ...) and the layer names and shapes that
``SynthSeg/predict_synthseg.py::build_model`` (commit 66342c1) creates, so the original code
loads them with ``load_weights(path, by_name=True)``. The values are NOT trained weights.

Only numpy and h5py are used, and every value comes from the raw 64-bit output of
``numpy.random.default_rng(seed).bit_generator`` (PCG64, whose stream numpy keeps fixed)
turned into floats by exact arithmetic, so the files are the same bit for bit on any platform
and numpy version. BatchNorm running statistics and a few output biases come from
``calibration.npz`` beside this script (float16 numbers measured once on a real crop: see
README.md); without it they default to mean 0, variance 1 and bias 0. Two deliberate changes
keep whole runs comparable despite the random networks' chaos: the second robust segmenter gets
no weight on its group inputs, and the parcellation network's mask inputs are scaled by
``PARC_MASK_SCALE`` (README.md).

Usage: ``python make_random_weights.py OUTPUT_FOLDER [--no-calibration]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
CALIBRATION = HERE / "calibration.npz"
FILES = {"robust": "synthseg_robust_2.0_random.h5", "parc": "synthseg_parc_2.0_random.h5",
         "qc": "synthseg_qc_2.0_random.h5"}
SEEDS = {"robust": 2031, "parc": 2032, "qc": 2033}
#: factor on the mask-channel weights (input channels 1-2: not-cortex, cortex) of the parcellation
#: network's first convolution; a power of two, so the scaled float32 values are exact
PARC_MASK_SCALE = 2.0**-8


def unet_layers(prefix: str, in_channels: int, out_channels: int, features: int, kernel: int,
                levels: int = 5, skip_n_concatenations: int = 0, with_input: bool = False
                ) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(layer name, {weight: shape}) of ``ext/neuron/models.py::unet`` in creation order
    (2 convolutions per level, feat_mult 2, batch_norm -1, softmax output)."""
    feats = [features * 2**i for i in range(levels)]
    layers: list[tuple[str, dict]] = [(f"{prefix}_input", {})] if with_input else []

    def conv(name: str, k: int, cin: int, cout: int) -> None:
        layers.append((name, {"kernel": (k, k, k, cin, cout), "bias": (cout,)}))

    def bn(name: str, c: int) -> None:
        layers.append((name, {w: (c,) for w in ("gamma", "beta", "moving_mean", "moving_variance")}))

    cin = in_channels
    for level in range(levels):
        conv(f"{prefix}_conv_downarm_{level}_0", kernel, cin, feats[level])
        conv(f"{prefix}_conv_downarm_{level}_1", kernel, feats[level], feats[level])
        bn(f"{prefix}_bn_down_{level}", feats[level])
        if level < levels - 1:
            layers.append((f"{prefix}_maxpool_{level}", {}))
        cin = feats[level]
    for step in range(levels - 1):
        level = levels - 2 - step
        layers.append((f"{prefix}_up_{levels + step}", {}))
        if step < levels - skip_n_concatenations - 1:
            layers.append((f"{prefix}_merge_{levels + step}", {}))
            cin = feats[level + 1] + feats[level]
        else:
            cin = feats[level + 1]
        conv(f"{prefix}_conv_uparm_{levels + step}_0", kernel, cin, feats[level])
        conv(f"{prefix}_conv_uparm_{levels + step}_1", kernel, feats[level], feats[level])
        bn(f"{prefix}_bn_up_{step}", feats[level])
    conv(f"{prefix}_likelihood", 1, feats[0], out_channels)
    layers.append((f"{prefix}_prediction", {}))
    return layers


def qc_layers(in_channels: int = 9, out_channels: int = 9, features: int = 24, kernel: int = 5,
              levels: int = 4) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """Layers of the QC regressor: ``ext/neuron/models.py::conv_enc`` with residuals (ReLU),
    then ``qc_maxpool_3`` and two 5x5x5 ReLU convolutions (``predict_synthseg.py::build_model``)."""
    layers: list[tuple[str, dict]] = []
    cin = in_channels
    for level in range(levels):
        cout = features * 2**level
        for j in range(2):
            layers.append((f"qc_conv_downarm_{level}_{j}",
                           {"kernel": (kernel,) * 3 + (cin if j == 0 else cout, cout), "bias": (cout,)}))
            if j == 0 and cin > 1 and cout > 1 and cin != cout:  # Keras lists it here
                layers.append((f"qc_expand_down_merge_{level}",
                               {"kernel": (kernel,) * 3 + (cin, cout), "bias": (cout,)}))
        layers.append((f"qc_res_down_merge_{level}", {}))
        layers.append((f"qc_res_down_merge_act_{level}", {}))
        layers.append((f"qc_bn_down_{level}", {w: (cout,) for w in
                                                ("gamma", "beta", "moving_mean", "moving_variance")}))
        if level < levels - 1:
            layers.append((f"qc_maxpool_{level}", {}))
        cin = cout
    layers.append(("qc_maxpool_3", {}))
    layers.append(("qc_final_conv_0", {"kernel": (kernel,) * 3 + (cin, out_channels), "bias": (out_channels,)}))
    layers.append(("qc_final_conv_1", {"kernel": (kernel,) * 3 + (out_channels, out_channels),
                                       "bias": (out_channels,)}))
    layers.append(("qc_final_pred", {}))
    return layers


def network_layers(which: str) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """The layers each file holds, as ``build_model`` names them."""
    if which == "robust":  # segmenter of 5 label groups -> denoiser -> segmenter of image + groups
        return (unet_layers("unet", 1, 5, 24, 3, with_input=True)
                + unet_layers("l2l", 5, 5, 16, 5, skip_n_concatenations=2)
                + unet_layers("unet2", 6, 33, 24, 3))
    if which == "parc":  # image + one-hot cortex mask -> 69 parcellation labels
        return unet_layers("unet_parc", 3, 69, 24, 3)
    if which == "qc":  # one-hot of 9 QC label groups -> 9 scores
        return qc_layers()
    raise ValueError(which)


class _Uniform:
    """Uniform numbers from the raw PCG64 stream by exact arithmetic (no libm calls)."""

    def __init__(self, seed: int):
        self.bits = np.random.default_rng(seed).bit_generator

    def __call__(self, low: float, high: float, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        k = (self.bits.random_raw(n) >> np.uint64(40)).astype(np.float64)  # 24-bit integers
        u = (k + 0.5) / 2.0**24  # exact, in (0, 1)
        return (low + (high - low) * u).astype(np.float32).reshape(shape)


def make_weights(which: str, calibration: dict[str, np.ndarray] | None = None
                 ) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Every layer's arrays (Keras shapes, float32) for one file, in layer order."""
    draw = _Uniform(SEEDS[which])
    out = []
    for name, shapes in network_layers(which):
        arrays: dict[str, np.ndarray] = {}
        if "kernel" in shapes:
            k = shapes["kernel"]
            fan_in = int(np.prod(k[:-1]))
            # He uniform for the hidden convolutions; a wide head (std 6/sqrt(fan_in)) so the
            # softmax outputs are decisive, as in set A's random files
            std = 6.0 / np.sqrt(fan_in) if name.endswith("_likelihood") else np.sqrt(2.0 / fan_in)
            a = std * np.sqrt(3.0)
            arrays["kernel"] = draw(-a, a, k)
            arrays["bias"] = draw(-0.1, 0.1, shapes["bias"])
            if name == "unet2_conv_downarm_0_0":
                # the second segmenter ignores the denoised groups (input channels 1-5): with
                # random weights it amplifies any change in them chaotically (one near-tie voxel
                # of the first segmenter changed a quarter of its output), which would make
                # whole --robust runs impossible to compare; each network is tested on its own
                arrays["kernel"][..., 1:, :] = 0
            if name == "unet_parc_conv_downarm_0_0":
                # the parcellation network barely listens to the cortex mask (input channels 1-2):
                # at full weight one flipped voxel of the mask changed ~1,000 voxels of its argmax
                # (chaotic random network), so a near-tie voxel of the segmentation would spoil
                # whole --parc runs; scaled, not zeroed, so swapped or dropped mask channels still
                # change the parcellation clearly (README.md, "Why unet_parc barely sees the mask")
                arrays["kernel"][..., 1:, :] *= np.float32(PARC_MASK_SCALE)
        if "gamma" in shapes:
            c = shapes["gamma"]
            arrays["gamma"] = draw(0.6, 1.6, c)
            arrays["beta"] = draw(-0.5, 0.5, c)
            arrays["moving_mean"] = np.zeros(c, np.float32)
            arrays["moving_variance"] = np.ones(c, np.float32)
        if calibration is not None:
            for w in list(arrays):
                key = f"{name}/{w}"
                if key in calibration:
                    value = calibration[key].astype(np.float32)
                    if value.shape != arrays[w].shape:
                        raise ValueError(f"calibration {key} has shape {value.shape}, not {arrays[w].shape}")
                    arrays[w] = value
        out.append((name, arrays))
    return out


def _names(values: list[str]) -> np.ndarray:
    return np.array([v.encode("utf8") for v in values]) if values else np.array([])


def write_keras_file(path: Path, layers: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """Write weights the way Keras 2.15 ``Model.save_weights(... .h5)`` does."""
    order = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")
    with h5py.File(path, "w") as f:
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        f.attrs["layer_names"] = _names([name for name, _ in layers])
        for name, arrays in layers:
            group = f.create_group(name)
            weight_names = [f"{name}/{w}:0" for w in order if w in arrays]
            group.attrs["weight_names"] = _names(weight_names)
            for w in weight_names:
                group.create_dataset(w, data=arrays[w.split("/")[-1][:-2]])


def load_calibration(path: Path = CALIBRATION) -> dict[str, np.ndarray] | None:
    """The stored calibration numbers, or None if the file is absent."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--no-calibration", action="store_true", help="ignore calibration.npz")
    parser.add_argument("--only", choices=sorted(FILES), action="append", help="write only these files")
    args = parser.parse_args(argv)
    calibration = None if args.no_calibration else load_calibration()
    args.output.mkdir(parents=True, exist_ok=True)
    for which in args.only or FILES:
        write_keras_file(args.output / FILES[which], make_weights(which, calibration))


if __name__ == "__main__":
    main()
