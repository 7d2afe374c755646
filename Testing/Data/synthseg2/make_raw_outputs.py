"""Compute raw/networks_t1crop64.npz (and raw/makeshape.npz) with the ORIGINAL SynthSeg code.

Runs under a TensorFlow environment for the original code (see README.md: Python 3.11,
tensorflow-cpu 2.15.1, keras 2.15.0, numpy 1.23.5, scipy 1.11.4, nibabel 5.2.1, h5py), never
under the project's. It imports SynthSeg (github BBillot/SynthSeg, commit 66342c1) from a
checkout given on the command line and calls its ``predict_synthseg.py::build_model`` with the
labels prepared exactly as ``predict`` prepares them, the random files of
``make_random_weights.py``, set A's ``synthseg_2.0_random.h5`` as segmentation network and
``input_shape_qc=64``, on set A's ``raw/raw_2.0_t1crop64.npz`` input (64^3, normalised). No line
of SynthSeg is patched: the chains are built and predicted as they are.

Usage::

    python make_random_weights.py WEIGHTS                    # any Python with numpy + h5py
    python make_raw_outputs.py SYNTHSEG WEIGHTS [--only CHAIN ...] [--makeshape] [--threads 2] [--full F]

``SYNTHSEG``: the original code (the folder holding ``SynthSeg/`` and ``ext/``); ``WEIGHTS``: the
folder make_random_weights.py wrote. Without ``--only`` every chain is computed and
``raw/networks_t1crop64.npz`` is rewritten; with ``--only`` (chains below) the other keys are
copied unchanged from the existing file. ``--makeshape`` also rewrites ``raw/makeshape.npz`` (it
needs the ``default`` chain's segmentation, computed if not selected). Set A's folder is
``$SYNTHSEG_MONAI_SHARED/reference/keras-synthseg`` (default ``../shared`` beside the repository).
``--full F`` also saves the whole outputs of the computed chains (uncompressed, large) to F.

Stored (X, Y, Z = 64): ``sample_index`` (1024 flat voxel indices, ``default_rng(64)``),
``qc_shape`` (64); for each posterior array ``<name>_argmax`` (uint8) and ``<name>_sample``
(float32 (1024, C), the softmax at those voxels rounded to 2^-20); QC outputs (9,) float32.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SYNTHSEG_MONAI_SHARED", HERE.parents[2].parent / "shared"))
KERAS_REF = SHARED / "reference" / "keras-synthseg"
OUTPUT = HERE / "raw" / "networks_t1crop64.npz"
MAKESHAPE = HERE / "raw" / "makeshape.npz"
QC_SHAPE = 64
WEIGHT_FILES = {"robust": "synthseg_robust_2.0_random.h5", "parc": "synthseg_parc_2.0_random.h5",
                "qc": "synthseg_qc_2.0_random.h5"}
#: chain -> the keys it writes (README.md, "raw/networks_t1crop64.npz")
CHAINS = {
    "robust": ("robust_groups", "robust_denoised", "robust_posteriors"),
    "default_parc": ("default_seg", "default_parc"),
    "fast_parc": ("fast_seg", "fast_parc", "fast_seg_smoothed"),
    "default_qc": ("default_qc",),
    "fast_qc": ("fast_qc",),
    "fast_parc_qc": ("fast_parc_qc_parc", "fast_parc_qc_qc"),
    "robust_parc_qc": ("robust_parc_qc_parc", "robust_parc_qc_qc"),
}
#: the chains whose outputs depend on the parcellation weights
PARC_CHAINS = ("default_parc", "fast_parc", "fast_parc_qc", "robust_parc_qc")


class Original:
    """The original ``build_model`` chains with the random weights."""

    def __init__(self, synthseg: Path, weights: Path, threads: int):
        sys.path.insert(0, str(synthseg))
        import tensorflow as tf

        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        from ext.lab2im import utils
        from SynthSeg.predict import get_flip_indices
        from SynthSeg.predict_synthseg import MakeShape, build_model

        self.build_model, self.make_shape_layer = build_model, MakeShape
        self.utils, self.get_flip_indices = utils, get_flip_indices
        self.labels_dir = synthseg / "data" / "labels_classes_priors"
        self.weights = weights

    def labels(self, robust: bool, fast: bool):
        """``predict_synthseg.py::predict``'s label preparation."""
        utils, lab = self.utils, self.labels_dir
        seg, _ = utils.get_list_labels(label_list=str(lab / "synthseg_segmentation_labels_2.0.npy"))
        if not fast and not robust:
            seg, flip, unique_idx = self.get_flip_indices(seg, 19)
        else:
            seg, unique_idx = np.unique(seg, return_index=True)
            flip = None
        denoiser = np.unique(utils.get_list_labels(str(lab / "synthseg_denoiser_labels_2.0.npy"))[0])
        parc, _ = np.unique(utils.get_list_labels(str(lab / "synthseg_parcellation_labels.npy"))[0],
                            return_index=True)
        qc = utils.get_list_labels(str(lab / "synthseg_qc_labels_2.0.npy"))[0][unique_idx]
        return seg, flip, denoiser, parc, qc

    def model(self, robust: bool = False, fast: bool = False, parc: bool = False, qc: bool = False):
        seg, flip, denoiser, parc_labels, qc_labels = self.labels(robust, fast)
        segmenter = (self.weights / WEIGHT_FILES["robust"] if robust else KERAS_REF / "synthseg_2.0_random.h5")
        return self.build_model(
            path_model_segmentation=str(segmenter),
            path_model_parcellation=str(self.weights / WEIGHT_FILES["parc"]),
            path_model_qc=str(self.weights / WEIGHT_FILES["qc"]), input_shape_qc=QC_SHAPE,
            labels_segmentation=seg, labels_denoiser=denoiser, labels_parcellation=parc_labels,
            labels_qc=qc_labels, sigma_smoothing=0.5, flip_indices=flip, robust=robust,
            do_parcellation=parc, do_qc=qc)

    def make_shape(self, index_map: np.ndarray, target: int) -> np.ndarray:
        """The original ``MakeShape`` layer alone on an index map."""
        import keras.layers as KL
        from keras.models import Model

        inp, shape = KL.Input(index_map.shape, dtype="int32"), KL.Input([3], dtype="int32")
        m = Model([inp, shape], self.make_shape_layer(target)([inp, shape]))
        return m.predict([index_map[None].astype(np.int32), np.array([index_map.shape])], verbose=0)[0]


def compute(orig: Original, chains: list[str], image: np.ndarray) -> dict[str, np.ndarray]:
    """Full outputs (posteriors (X, Y, Z, C) float32, QC (9,)) of the selected chains."""
    from keras.models import Model

    img, shape = image[None, ..., None], np.array([image.shape])
    res: dict[str, np.ndarray] = {}
    if "robust" in chains:  # --robust: the three stages
        net = orig.model(robust=True, fast=True)
        m = Model(net.inputs, [net.get_layer(n).output for n in
                               ("unet_prediction", "l2l_prediction", "unet2_prediction")])
        for key, out in zip(CHAINS["robust"], m.predict(img, verbose=0)):
            res[key] = out[0]
    if "default_parc" in chains:  # --parc: [average_lr, smoothed parcellation]
        seg, parc = orig.model(parc=True).predict(img, verbose=0)
        res["default_seg"], res["default_parc"] = seg[0], parc[0]
    if "fast_parc" in chains:  # --parc --fast: [unet_prediction (unsmoothed), smoothed parc]; the seg blur
        net = orig.model(parc=True, fast=True)
        blur = [layer for layer in net.layers if type(layer).__name__ == "GaussianBlur"][0]
        seg, parc, smoothed = Model(net.inputs, net.outputs + [blur.output]).predict(img, verbose=0)
        res["fast_seg"], res["fast_parc"], res["fast_seg_smoothed"] = seg[0], parc[0], smoothed[0]
    if "default_qc" in chains:  # --qc: [average_lr, qc]
        seg, qc = orig.model(qc=True).predict([img, shape], verbose=0)
        if "default_seg" in res:
            assert np.array_equal(seg[0], res["default_seg"]), "default segmentation differs between builds"
        res["default_qc"] = qc[0]
    if "fast_qc" in chains:  # --qc --fast: QC of the SMOOTHED argmax
        seg, qc = orig.model(qc=True, fast=True).predict([img, shape], verbose=0)
        if "fast_seg" in res:
            assert np.array_equal(seg[0], res["fast_seg"]), "its segmentation output is unet_prediction"
        res["fast_qc"] = qc[0]
    if "fast_parc_qc" in chains:  # --parc --qc --fast: unsmoothed parcellation, QC of the unsmoothed argmax
        _, parc, qc = orig.model(parc=True, qc=True, fast=True).predict([img, shape], verbose=0)
        res["fast_parc_qc_parc"], res["fast_parc_qc_qc"] = parc[0], qc[0]
    if "robust_parc_qc" in chains:  # --parc --robust --qc (--fast)
        seg, parc, qc = orig.model(robust=True, parc=True, qc=True, fast=True).predict([img, shape], verbose=0)
        if "robust_posteriors" in res:
            assert np.array_equal(seg[0], res["robust_posteriors"]), "its segmentation output is unet2's"
        res["robust_parc_qc_parc"], res["robust_parc_qc_qc"] = parc[0], qc[0]
    return res


def pack(res: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The stored form: argmax maps, softmax samples rounded to 2^-20, QC scores."""
    out = {}
    for key, value in res.items():
        if value.ndim == 4:
            out[f"{key}_argmax"] = value.argmax(-1).astype(np.uint8)
            sample = value.reshape(-1, value.shape[-1])[index].astype(np.float64)
            out[f"{key}_sample"] = (np.round(sample * 2**20) / 2**20).astype(np.float32)
        else:
            out[key] = value.astype(np.float32)
    return out


def makeshape_cases(default_index: np.ndarray, orig: Original) -> dict[str, np.ndarray]:
    """``MakeShape`` on 5 index maps x 4 target sizes."""
    rng = np.random.default_rng(5)
    cases = {
        "seg64": default_index,
        "offcentre": np.pad(default_index[10:50, :, 20:44], ((0, 30), (5, 0), (0, 8))),  # 70x69x32
        "empty": np.zeros((40, 48, 56), int),
        "only24": np.where(rng.uniform(size=(32, 40, 48)) < 0.3, 24, 0),
        "odd_blob": np.pad(rng.integers(0, 33, (13, 21, 8)), ((3, 40), (30, 2), (7, 7))),
    }
    out = {}
    for name, index_map in cases.items():
        out[f"{name}_input"] = index_map.astype(np.uint8)
        for target in (32, 48, 75, 96):
            out[f"{name}_t{target}"] = orig.make_shape(index_map, target).astype(np.uint8)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("synthseg", type=Path, help="the original SynthSeg code (commit 66342c1)")
    parser.add_argument("weights", type=Path, help="the folder make_random_weights.py wrote")
    parser.add_argument("--only", choices=sorted(CHAINS), action="append",
                        help="compute only these chains; the other keys are kept from the existing file")
    parser.add_argument("--makeshape", action="store_true", help="also rewrite raw/makeshape.npz")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", type=Path, help="also save the whole outputs here (to measure a port on them)")
    args = parser.parse_args(argv)
    chains = args.only or list(CHAINS)
    if args.makeshape and "default_parc" not in chains:
        chains.append("default_parc")
    with np.load(KERAS_REF / "raw" / "raw_2.0_t1crop64.npz", allow_pickle=False) as z:
        image = z["input"]
    assert image.shape == (QC_SHAPE,) * 3, image.shape
    index = np.sort(np.random.default_rng(64).choice(image.size, 1024, replace=False)).astype(np.int32)
    orig = Original(args.synthseg.resolve(), args.weights.resolve(), args.threads)
    res = compute(orig, chains, image)
    if args.full:
        np.savez(args.full, **res)
    new = pack(res, index)
    out = {"sample_index": index, "qc_shape": np.array(QC_SHAPE, np.int32)}
    if args.only:
        with np.load(args.output, allow_pickle=False) as z:
            old = {k: z[k] for k in z.files}
        assert np.array_equal(old["sample_index"], index) and int(old["qc_shape"]) == QC_SHAPE
        selected = {k for c in args.only for k in CHAINS[c]}
        out.update({k: v for k, v in old.items() if k not in out and k.removesuffix("_argmax").removesuffix(
            "_sample") not in selected})
        out.update({k: v for k, v in new.items() if k.removesuffix("_argmax").removesuffix("_sample") in selected})
        out = {k: out[k] for k in old}  # the file's key order
    else:
        out.update(new)
    np.savez_compressed(args.output, **out)
    print("wrote", args.output, "chains:", ", ".join(args.only or CHAINS), flush=True)
    if args.makeshape:
        np.savez_compressed(MAKESHAPE, **makeshape_cases(res["default_seg"].argmax(-1), orig))
        print("wrote", MAKESHAPE, flush=True)


if __name__ == "__main__":
    main()
