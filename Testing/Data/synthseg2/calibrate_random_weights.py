"""Measure the numbers in calibration.npz that keep the random networks' outputs non-degenerate.

Run once; it is not needed to regenerate the weights (make_random_weights.py only reads the
result). Steps, each merged into calibration.npz, in this order (each applies what is there):
``robust``, ``parc``, ``qc --qc-input groups224.npy``, then, after computing with Keras the input
of ``qc_final_conv_0`` for that 224^3 map (see README.md), ``qc-head --qc-features feats.npy``.

The uncalibrated networks are loaded with the engine's Keras import and fed a real scan (set
A's ``inputs/t1_crop.mgz``, 96^3, RAS-aligned and normalised as SynthSeg does), in the
original's chain order (robust: unet -> l2l -> unet2; parcellation and QC on the argmax of set
A's 2.0 segmenter, smoothed):

- every BatchNorm gets moving_mean = (mean of its real input) + N(0, 0.25) x std and
  moving_variance = (variance of its real input) x U(0.6, 1.8), per channel, in forward order
  (the QC network on its 96^3 input);
- each softmax head's bias is tuned so the argmax label frequencies follow a random target
  (background x4); the QC head's two biases are set so half of ``qc_final_conv_0``'s outputs
  are positive and the 9 scores of the 224^3 input land on U(0.3, 0.8) targets.

Values are stored as float16 (``<layer>/<weight>`` keys). Needs torch, nibabel and the engine
(``SynthSegMONAILib``) on the path; reads the shared reference folder (``SYNTHSEG_MONAI_SHARED``,
default ``../shared`` beside the repository).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SHARED = Path(os.environ.get("SYNTHSEG_MONAI_SHARED", REPO.parent / "shared"))
sys.path[:0] = [str(HERE), str(REPO / "SynthSegMONAI")]

import make_random_weights as mrw  # noqa: E402

from SynthSegMONAILib.keras_import import load_keras_model  # noqa: E402
from SynthSegMONAILib.keras_import_synthseg2 import (  # noqa: E402
    load_keras_parcellation,
    load_keras_qc,
    load_keras_robust,
    qc_keras_name,
    unet_keras_name,
)
from SynthSegMONAILib.synthseg2_networks import (  # noqa: E402
    DENOISER_GROUPS,
    one_hot_argmax,
    parcellation_input,
    qc_input,
    smooth_posteriors,
)

RNG = np.random.default_rng(77)


def t1_image() -> torch.Tensor:
    """set A's T1 crop (96^3, 1 mm), RAS-aligned and normalised (0.5/99.5 percentiles) as SynthSeg does."""
    img = nib.load(SHARED / "reference" / "keras-synthseg" / "inputs" / "t1_crop.mgz")
    x = nib.as_closest_canonical(img).get_fdata()
    lo, hi = np.percentile(x, [0.5, 99.5])
    return torch.from_numpy(((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32))


def calibrate_batchnorms(net: torch.nn.Module, x: torch.Tensor, name_of) -> dict[str, np.ndarray]:
    """One forward pass; each BatchNorm's statistics are set from its real input just before it runs."""
    out: dict[str, np.ndarray] = {}
    handles = []
    for mod_name, mod in net.named_modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            def hook(module, args, mod_name=mod_name):
                h = args[0]
                mean, var = h.mean((0, 2, 3, 4)), h.var((0, 2, 3, 4), unbiased=False)
                noise = torch.from_numpy(RNG.normal(0, 0.25, mean.shape).astype(np.float32))
                scale = torch.from_numpy(RNG.uniform(0.6, 1.8, mean.shape).astype(np.float32))
                m = (mean + noise * var.sqrt()).numpy().astype(np.float16)
                v = np.maximum((var * scale).numpy(), 1e-3).astype(np.float16)
                module.running_mean.copy_(torch.from_numpy(m.astype(np.float32)))
                module.running_var.copy_(torch.from_numpy(v.astype(np.float32)))
                layer, _ = name_of(f"{mod_name}.running_mean")
                out[f"{layer}/moving_mean"], out[f"{layer}/moving_variance"] = m, v
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return out


def tune_head_bias(net, x: torch.Tensor, head_layer: str, steps: int = 300) -> dict[str, np.ndarray]:
    """Bias of the 1x1x1 head so that the argmax frequencies follow a random target."""
    feats = {}
    handle = net.head.register_forward_pre_hook(lambda m, a: feats.setdefault("x", a[0]))
    with torch.no_grad():
        net(x)
    handle.remove()
    c = net.head.out_channels
    w = net.head.weight.detach().reshape(c, -1)
    logits = torch.einsum("ck,kn->cn", w, feats["x"][0].reshape(w.shape[1], -1))
    target = RNG.uniform(0.5, 1.5, c)
    target[0] *= 4
    target /= target.sum()
    bias = net.head.bias.detach().numpy().astype(np.float64)
    for _ in range(steps):
        freq = np.bincount((logits + torch.from_numpy(bias.astype(np.float32))[:, None]).argmax(0).numpy(),
                           minlength=c) / logits.shape[1]
        bias += 0.5 * (np.log(target) - np.log(freq + 1e-4))
    b16 = bias.astype(np.float16)
    with torch.no_grad():
        net.head.bias.copy_(torch.from_numpy(b16.astype(np.float32)))
    return {f"{head_layer}/bias": b16}


def calibrate_qc_head(qc, feats: torch.Tensor) -> dict[str, np.ndarray]:
    """Biases of qc_final_conv_0 (half its outputs positive) and qc_final_conv_1 (the scores land on
    U(0.3, 0.8) targets), from ``feats``, the input of qc_final_conv_0 (1, 192, X, Y, Z)."""
    with torch.no_grad():
        z0 = torch.nn.functional.conv3d(feats, qc.final0.weight, padding=2)
        b0 = (-z0.flatten(2).median(-1).values[0]).numpy().astype(np.float16)
        a0 = torch.relu(z0 + torch.from_numpy(b0.astype(np.float32))[None, :, None, None, None])
        z1 = torch.nn.functional.conv3d(a0, qc.final1.weight, padding=2)[0].flatten(1).double()
    target = RNG.uniform(0.3, 0.8, z1.shape[0])
    b1 = np.zeros(z1.shape[0])
    for c in range(z1.shape[0]):  # mean(relu(z + b)) increases with b: bisection
        lo, hi = -1e3, 1e3
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if torch.relu(z1[c] + mid).mean() < target[c] else (lo, mid)
        b1[c] = (lo + hi) / 2
    return {"qc_final_conv_0/bias": b0, "qc_final_conv_1/bias": b1.astype(np.float16)}


def save(cal: dict[str, np.ndarray]) -> None:
    """Merge into calibration.npz (so each step can be run on its own)."""
    old = mrw.load_calibration() or {}
    np.savez_compressed(HERE / "calibration.npz", **{**old, **cal})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="measure calibration.npz")
    parser.add_argument("step", choices=["robust", "parc", "qc", "qc-head"])
    parser.add_argument("--qc-input", type=Path, help="qc step: also save the 224^3 QC group map here")
    parser.add_argument("--qc-features", type=Path,
                        help="qc-head step: input of qc_final_conv_0 at 224^3 (X, Y, Z, 192), from Keras")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    image = t1_image()
    x = image[None, None]
    with tempfile.TemporaryDirectory() as tmp:
        mrw.main([tmp])  # the calibration measured so far is applied
        robust = load_keras_robust(Path(tmp) / mrw.FILES["robust"])
        parc = load_keras_parcellation(Path(tmp) / mrw.FILES["parc"])
        qc = load_keras_qc(Path(tmp) / mrw.FILES["qc"])
    seg, _ = load_keras_model(SHARED / "reference" / "keras-synthseg" / "synthseg_2.0_random.h5")
    with torch.no_grad():
        seg_post = smooth_posteriors(torch.softmax(seg(x), 1)[0])
    cal: dict[str, np.ndarray] = {}

    if args.step == "robust":
        def stage_input(attr: str) -> torch.Tensor:
            g = one_hot_argmax(torch.softmax(robust.segmenter(x), 1), DENOISER_GROUPS)
            if attr == "denoiser":
                return g
            return torch.cat([x, one_hot_argmax(torch.softmax(robust.denoiser(g), 1), DENOISER_GROUPS)], 1)

        for attr, prefix in (("segmenter", "unet"), ("denoiser", "l2l"), ("segmenter2", "unet2")):
            net = getattr(robust, attr)
            with torch.no_grad():
                inp = x if attr == "segmenter" else stage_input(attr)
            cal.update(calibrate_batchnorms(net, inp, lambda k, p=prefix: unet_keras_name(k, p, 5)))
            cal.update(tune_head_bias(net, inp, f"{prefix}_likelihood"))
    elif args.step == "parc":
        with torch.no_grad():
            parc_in = parcellation_input(image, seg_post)
        cal.update(calibrate_batchnorms(parc, parc_in, lambda k: unet_keras_name(k, "unet_parc", 5)))
        cal.update(tune_head_bias(parc, parc_in, "unet_parc_likelihood"))
    elif args.step == "qc":
        with torch.no_grad():
            q_in = qc_input(seg_post, target=96)
        cal.update(calibrate_batchnorms(qc, q_in, qc_keras_name))
        if args.qc_input:
            with torch.no_grad():
                np.save(args.qc_input, qc_input(seg_post, target=224)[0].argmax(0).numpy().astype(np.uint8))
    else:
        feats = np.load(args.qc_features, allow_pickle=False)
        cal.update(calibrate_qc_head(qc, torch.from_numpy(feats).permute(3, 0, 1, 2)[None].float()))
    save(cal)
    print("calibrated", args.step, flush=True)


if __name__ == "__main__":
    main()
