"""Files made to mislead: each is crafted here and must be refused with its own message (or
handled correctly), with a non-zero exit and no traceback; folder mode goes on.

Every case that could exhaust memory runs in a subprocess under an address-space limit
(``RLIMIT_AS``), so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from SynthSegMONAILib.cli import main
from SynthSegMONAILib.labels import synthseg_labels
from SynthSegMONAILib.model_file import (
    DEFAULT_PREPROCESSING,
    ModelInfo,
    _checksum,
    model_tensors,
    save_model,
    weight_problem,
)
from SynthSegMONAILib.network import SynthSegUNet, UNetConfig

REPO = Path(__file__).resolve().parents[3]
LABELS = synthseg_labels("2.0")
TINY = UNetConfig(out_channels=len(LABELS), levels=2, features=4)
PRE = dict(DEFAULT_PREPROCESSING, min_pad=32)  # SynthSeg pads to 128^3; 32^3 keeps these runs quick
GIB = 2**30


PROBE = ("import h5py, SynthSegMONAILib.cli, SynthSegMONAILib.pipeline, SynthSegMONAILib.keras_import\n"
         "status = open('/proc/self/status').read().splitlines()\n"
         "print(next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmSize:')))")


def _address_space_limit() -> int:
    """The address space the imports take (0.9 GiB with a CPU build of torch, several GiB with a
    CUDA build), plus 1.3 GiB: a small run needs about 0.3 GiB more than the imports (1.15 GiB
    in all was measured with the CPU build), and each crafted file would need 2 GiB or more.
    Kept this tight, the crop the engine suggests for a 256^3 scan is small and quick to run."""
    probe = subprocess.run([sys.executable, "-c", PROBE], env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr
    return int(probe.stdout.split()[-1]) + 13 * GIB // 10


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    info = ModelInfo(network=TINY, labels=LABELS, name="tiny", preprocessing=PRE)
    return save_model(path, SynthSegUNet(TINY), info)


def _head(shape=(24, 26, 22)) -> np.ndarray:
    g = np.indices(shape, dtype=np.float32)
    centre = (np.asarray(shape, dtype=np.float32) / 2)[:, None, None, None]
    r = np.sqrt((((g - centre) / centre) ** 2).sum(0))
    return (np.where(r < 0.9, 80.0, 5.0) + np.where(r < 0.5, 40.0, 0.0)).astype(np.float32)


def _nifti(path: Path, data: np.ndarray, zoom: float = 1.0) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), str(path))
    return path


def _segment(model: Path, inp: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["--i", str(inp), "--o", str(out), "--model", str(model), "--threads", "2", *extra])
    return rc, capsys.readouterr().err


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _env() -> dict[str, str]:
    paths = [str(REPO / "SynthSegMONAI"), str(REPO / "SynthSegMONAITraining")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="2")


# --- crafted files ----------------------------------------------------------------------------

def _model_file(path: Path, network: dict | None = None, preprocessing: dict | None = None,
                tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A model file with a VALID checksum over whatever metadata and tensors it is given."""
    torch.manual_seed(0)
    tensors = tensors if tensors is not None else model_tensors(SynthSegUNet(TINY))
    meta = ModelInfo(network=TINY, labels=LABELS, name=path.stem, preprocessing=PRE).metadata()
    if network is not None:
        meta["network"] = json.dumps(network)
    if preprocessing is not None:
        meta["preprocessing"] = json.dumps(preprocessing)
    meta["checksum"] = _checksum(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def _keras_layers(cfg: UNetConfig) -> dict[str, dict[str, np.ndarray]]:
    """A network's weights in the official Keras file's layer names and layouts."""
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in model_tensors(SynthSegUNet(cfg)).items()}
    layers: dict[str, dict[str, np.ndarray]] = {}

    def level(keras_conv: str, keras_bn: str, prefix: str) -> None:
        for j in range(cfg.convs_per_level):
            w = state[f"{prefix}.convs.{j}.conv.weight"]
            layers[f"{keras_conv}_{j}"] = {"kernel": np.transpose(w, (2, 3, 4, 1, 0)),
                                           "bias": state[f"{prefix}.convs.{j}.conv.bias"]}
        layers[keras_bn] = {k: state[f"{prefix}.bn.{v}"] for k, v in
                            (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
                             ("moving_variance", "running_var"))}

    for i in range(cfg.levels):
        level(f"unet_conv_downarm_{i}", f"unet_bn_down_{i}", f"encoder.{i}")
    for step in range(cfg.levels - 1):
        level(f"unet_conv_uparm_{cfg.levels + step}", f"unet_bn_up_{step}",
              f"decoder.{cfg.levels - 2 - step}")
    layers["unet_likelihood"] = {"kernel": np.transpose(state["head.weight"], (2, 3, 4, 1, 0)),
                                 "bias": state["head.bias"]}
    return layers


def _keras_file(path: Path, cfg: UNetConfig = TINY, edit=None) -> Path:
    """A weights-only Keras .h5 in the official layout; ``edit(file, layers)`` crafts it further."""
    layers = _keras_layers(cfg)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in ["unet_input", *layers]])
        f.create_group("unet_input").attrs["weight_names"] = np.array([], dtype="S1")
        for lname, weights in layers.items():
            group = f.create_group(lname)
            group.attrs["weight_names"] = np.array([f"{lname}/{w}:0".encode() for w in weights])
            for w, value in weights.items():
                group.create_dataset(f"{lname}/{w}:0", data=value)
        if edit is not None:
            edit(f, layers)
    return path


def _replace(f, layer: str, weight: str, make) -> None:
    group = f[layer][layer]
    del group[f"{weight}:0"]
    make(group, f"{weight}:0")


def _nhdr(path: Path, data_file: str | None, sizes=(24, 26, 22), extra: str = "", origin: str = "(0,0,0)",
          encoding: str = "raw") -> Path:
    text = (f"NRRD0004\ntype: float\ndimension: {len(sizes)}\nspace: left-posterior-superior\n"
            f"sizes: {' '.join(map(str, sizes))}\nspace directions: (2,0,0) (0,2,0) (0,0,2)\n"
            f"endian: little\nencoding: {encoding}\nspace origin: {origin}\n")
    if data_file is not None:
        text += f"data file: {data_file}\n"
    path.write_text(text + extra)
    return path


def _raw(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asfortranarray(data.astype("<f4")).tobytes(order="F"))
    return path


def _gzip_bomb(decompressed: int, head: bytes = b"") -> bytes:
    """A gzip stream of ``head`` then zeros, ``decompressed`` bytes in all (no trailer: it need
    not end). Built from one flushed block repeated, so it takes milliseconds."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    block = 16 * 2**20
    first = c.compress(head) + c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    repeat = c.compress(bytes(block)) + c.flush(zlib.Z_FULL_FLUSH)
    return first + repeat * (decompressed // block - 1)


# --- memory: every case in one subprocess under an address-space limit -------------------------

DRIVER = r"""
import contextlib, io, json, re, sys, time, traceback
from SynthSegMONAILib.cli import main
cases, results = json.load(open(sys.argv[1])), open(sys.argv[2], "w")
crop = None
for name, argv in cases:
    argv = [a.replace("{crop}", str(crop)) for a in argv]
    err, t = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except BaseException:
        rc = None
        err.write(traceback.format_exc())
    found = re.search(r"--crop (\d+)", err.getvalue())
    crop = found.group(1) if found else crop
    seconds = round(time.perf_counter() - t, 2)
    results.write(json.dumps({"name": name, "rc": rc, "err": err.getvalue(), "s": seconds}) + "\n")
    results.flush()
"""


@pytest.fixture(scope="module")
def limited(tiny_model, tmp_path_factory) -> dict[str, dict]:
    """Run every memory case in a subprocess limited to AS_LIMIT bytes of address space."""
    tmp = tmp_path_factory.mktemp("limited")
    out = tmp / "out"
    cases: list[tuple[str, list[str]]] = []

    def segment(name: str, image: Path, *extra: str, model: Path = tiny_model) -> None:
        cases.append((name, ["--i", str(image), "--o", str(out / name), "--model", str(model),
                             "--threads", "2", *extra]))

    segment("control", _nifti(tmp / "control.nii.gz", _head()))
    # a 500 KB file declaring 800^3 float32 voxels
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((800, 800, 800))
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    noise = np.random.default_rng(0).bytes(500_000)
    (tmp / "declares_800.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + noise, 1))
    segment("800 cubed", tmp / "declares_800.nii.gz")
    for zoom in (10.0, 20.0):  # 64^3 at 10-20 mm: a 640^3 to 1280^3 grid at 1 mm
        segment(f"{zoom:g} mm voxels", _nifti(tmp / f"coarse_{zoom:g}.nii.gz", _head((64, 64, 64)), zoom))
    # a NRRD whose gzip stream is 3 GiB long where the header declares 24x26x22 floats
    nrrd_head = np.asfortranarray(_head()).tobytes(order="F")
    (tmp / "bomb.nrrd").write_bytes(_nhdr(tmp / "bomb_header", None, encoding="gzip").read_bytes() + b"\n"
                                    + _gzip_bomb(3 * GIB, nrrd_head))
    segment("gzip bomb", tmp / "bomb.nrrd")
    # a NIfTI gzip stream far longer than its header declares (the data it declares are read, no more)
    good = nib.Nifti1Image(_head(), np.eye(4))
    good.header.set_data_dtype(np.float32)
    good.header["vox_offset"] = 352
    raw = good.header.binaryblock + b"\0" * 4 + np.asfortranarray(_head()).tobytes(order="F")
    (tmp / "long.nii.gz").write_bytes(_gzip_bomb(3 * GIB, raw))
    segment("long nifti stream", tmp / "long.nii.gz")
    # model metadata declaring a huge network (tensors of the tiny one, checksum recomputed)
    big = dict(TINY.to_dict(), features=200, levels=5)
    segment("200 features", tmp / "control.nii.gz", model=_model_file(tmp / "features200.safetensors", big))
    deep = dict(TINY.to_dict(), levels=64)
    segment("64 levels", tmp / "control.nii.gz", model=_model_file(tmp / "levels64.safetensors", deep))

    # an 18 MB-or-less .h5 holding an 800-million-element dataset (chunked, never written)
    def huge_bias(f, layers):
        _replace(f, "unet_conv_downarm_0_1", "bias",
                 lambda g, n: g.create_dataset(n, shape=(800_000_000,), dtype="f4", chunks=(1 << 20,),
                                               compression="gzip"))
    h5 = _keras_file(tmp / "huge.h5", edit=huge_bias)
    cases.append(("800M h5", ["import-keras", str(h5), "-o", str(out / "huge.safetensors")]))
    def wide_kernels(f, layers):  # declares 200 features in 5 levels: 919 million values
        for layer, shape in (("unet_conv_downarm_0_0", (3, 3, 3, 1, 200)),
                             ("unet_conv_downarm_1_0", (3, 3, 3, 200, 400))):
            _replace(f, layer, "kernel",
                     lambda g, n, shape=shape: g.create_dataset(n, shape=shape, dtype="f4", chunks=True))
    big_keras = _keras_file(tmp / "features200.h5", UNetConfig(out_channels=33, levels=5, features=4),
                            edit=wide_kernels)
    cases.append(("200 features h5", ["import-keras", str(big_keras), "-o", str(out / "f200.safetensors")]))
    # 256^3 at 1 mm: 33 posteriors of 2 GiB do not fit; the suggested --crop must then work
    big_image = _nifti(tmp / "big.nii.gz", _head((256, 256, 256)).astype(np.uint8))
    segment("needs a crop", big_image, "--fast")
    segment("with the suggested crop", big_image, "--fast", "--crop", "{crop}")
    # a detached header whose data file is a FIFO: refused, not waited on (last: a hang ends the run)
    fifo_dir = tmp / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "data.raw")
    segment("fifo", _nhdr(fifo_dir / "scan.nhdr", "data.raw"))

    (tmp / "cases.json").write_text(json.dumps(cases))
    results = tmp / "results.jsonl"

    as_limit = _address_space_limit()

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    try:
        subprocess.run([sys.executable, "-c", DRIVER, str(tmp / "cases.json"), str(results)], env=_env(),
                       preexec_fn=limit, timeout=240, capture_output=True)
    except subprocess.TimeoutExpired:
        pass
    lines = results.read_text().splitlines() if results.exists() else []
    done = {r["name"]: r for r in map(json.loads, lines)}
    done["_out"] = {"path": str(out)}
    return done


def _refused(result: dict | None, *words: str) -> str:
    assert result is not None, "the case did not finish (hang or crash)"
    err = result["err"]
    assert result["rc"] == 1, err[-3000:]
    assert "Traceback" not in err and "MemoryError" not in err, err[-3000:]
    for w in words:
        assert w in err, err[-3000:]
    return err


def test_a_small_run_fits_under_the_limit(limited):
    assert limited["control"]["rc"] == 0, limited["control"]["err"][-3000:]


@pytest.mark.parametrize("case", ["800 cubed", "10 mm voxels", "20 mm voxels"])
def test_declared_grids_over_the_limit_are_refused_before_loading(limited, case):
    err = _refused(limited.get(case), "over the limit of 512 voxels per side")
    if "mm" in case:
        assert "640x640x640" in err or "1280x1280x1280" in err


def test_gzip_stream_longer_than_declared(limited):
    _refused(limited.get("gzip bomb"), "longer than the 54912 bytes the header declares")
    assert limited["long nifti stream"]["rc"] == 0, limited["long nifti stream"]["err"][-3000:]


@pytest.mark.parametrize("case, words", [("200 features", "parameters (limit 200,000,000)"),
                                         ("64 levels", "levels = 64 is outside"),
                                         ("200 features h5", "parameters (limit 200,000,000)"),
                                         ("800M h5", "has shape (800000000,), expected (4,)")])
def test_networks_are_checked_against_their_tensors_before_being_built(limited, case, words):
    _refused(limited.get(case), words)


def test_memory_estimate_refuses_and_its_crop_then_fits(limited):
    err = _refused(limited.get("needs a crop"), "needs about", "is available", "--crop")
    assert re.search(r"needs about \d+\.\d GiB of memory, but only \d+(\.\d)? [GM]iB is available", err), err
    done = limited.get("with the suggested crop")
    assert done is not None and done["rc"] == 0, (done or {}).get("err", "")[-3000:]
    assert (Path(limited["_out"]["path"]) / "with the suggested crop").exists()


def test_fifo_data_file_is_refused_without_waiting(limited):
    _refused(limited.get("fifo"), "not a regular file")


# --- reading only what the user named ---------------------------------------------------------

def _detached_cases(tmp: Path) -> dict[str, Path]:
    data = _head()
    secret = _raw(tmp / "secret" / "secret.raw", data)  # the right size: only its place is wrong
    for i in (1, 2):
        _raw(tmp / "secret" / f"s{i}.raw", data[:, :, :11])
    scans = tmp / "scans"
    scans.mkdir()
    _raw(scans / "first_half.raw", data[:, :, :11])
    (scans / "link.raw").symlink_to(secret)
    return {
        "absolute path": _nhdr(scans / "absolute.nhdr", str(secret)),
        "../ path": _nhdr(scans / "parent.nhdr", "../secret/secret.raw"),
        "LIST entry": _nhdr(scans / "list.nhdr", "LIST", extra="first_half.raw\n../secret/s2.raw\n"),
        "pattern": _nhdr(scans / "pattern.nhdr", "../secret/s%d.raw 1 2 1"),
        "symlink out": _nhdr(scans / "symlink.nhdr", "link.raw"),
        "system file": _nhdr(scans / "passwd.nhdr", "/etc/passwd"),
    }


def test_detached_nrrd_reads_only_beside_its_header(tiny_model, tmp_path, capsys):
    for name, header in _detached_cases(tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "_").replace("/", "")
        rc, err = _segment(tiny_model, header, out / "seg.nii.gz", capsys,
                           "--resample", str(out / "res.nii.gz"))
        assert rc == 1, f"{name}: {err}"
        assert "outside the header's folder" in err, f"{name}: {err}"
        assert not _files(out), name


def test_detached_nrrd_inside_its_folder_still_works(tiny_model, tmp_path, capsys):
    from SynthSegMONAILib.volume_io import load_image

    data = _head()
    _raw(tmp_path / "data" / "scan.raw", data)
    _raw(tmp_path / "a.raw", data[:, :, :11])
    _raw(tmp_path / "b.raw", data[:, :, 11:])
    single = _nhdr(tmp_path / "single.nhdr", "data/scan.raw")
    listed = _nhdr(tmp_path / "listed.nhdr", "LIST", extra="a.raw\nb.raw\n")
    for header in (single, listed):
        assert np.array_equal(load_image(header).data, data)
    rc, err = _segment(tiny_model, listed, tmp_path / "seg.nii.gz", capsys)
    assert rc == 0, err


def test_detached_nrrd_of_the_wrong_size(tiny_model, tmp_path, capsys):
    _raw(tmp_path / "long.raw", np.concatenate([_head(), _head()], axis=2))
    rc, err = _segment(tiny_model, _nhdr(tmp_path / "scan.nhdr", "long.raw"), tmp_path / "seg.nii.gz", capsys)
    assert rc == 1 and "holds 109824 bytes of data where the header declares 54912" in err, err


def _keras_cases(tmp: Path) -> dict[str, tuple[Path, str]]:
    secret = tmp / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["bias"] = np.full(4, 7.0, dtype=np.float32)
    raw = tmp / "secret.bin"
    raw.write_bytes(np.full(4, 7.0, dtype="<f4").tobytes())

    def external_link(f, layers):
        _replace(f, "unet_conv_downarm_0_0", "bias",
                 lambda g, n: g.__setitem__(n, h5py.ExternalLink(str(secret), "/bias")))

    def virtual(f, layers):
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(secret), "bias", shape=(4,))
        _replace(f, "unet_conv_downarm_0_0", "bias", lambda g, n: g.create_virtual_dataset(n, layout))

    def external_storage(f, layers):
        _replace(f, "unet_conv_downarm_0_0", "bias",
                 lambda g, n: g.create_dataset(n, shape=(4,), dtype="<f4", external=[(str(raw), 0, 16)]))

    def wrong_rank(f, layers):
        kernel = layers["unet_conv_downarm_0_0"]["kernel"]
        _replace(f, "unet_conv_downarm_0_0", "kernel",
                 lambda g, n: g.create_dataset(n, data=kernel[..., 0, :]))

    def missing_bias(f, layers):
        group = f["unet_conv_downarm_1_0"]
        del group["unet_conv_downarm_1_0/bias:0"]
        group.attrs["weight_names"] = np.array([b"unet_conv_downarm_1_0/kernel:0"])

    def missing_group(f, layers):
        del f["unet_bn_up_0"]

    def strings(f, layers):
        _replace(f, "unet_bn_down_0", "gamma", lambda g, n: g.create_dataset(n, data=np.array([b"one"] * 4)))

    def nan(f, layers):
        _replace(f, "unet_bn_down_1", "moving_variance",
                 lambda g, n: g.create_dataset(n, data=np.full(8, np.nan, "f4")))

    edits = {"external link": (external_link, "is an external link"),
             "virtual dataset": (virtual, "is a virtual dataset"),
             "external storage": (external_storage, "dataset with external storage"),
             "wrong rank": (wrong_rank, "(rank 4); a 3D convolution kernel has rank 5"),
             "missing bias": (missing_bias, "weights missing for ['encoder.1.convs.0.conv.bias']"),
             "missing group": (missing_group,
                               "layer unet_bn_up_0 is listed in layer_names but its group is missing"),
             "string dataset": (strings, "holds |S3 values, not floating-point weights"),
             "NaN statistics": (nan, "tensor encoder.1.bn.running_var holds NaN or infinite values")}
    return {name: (_keras_file(tmp / f"{name.replace(' ', '_')}.h5", edit=edit), words)
            for name, (edit, words) in edits.items()}


def test_import_keras_refuses_crafted_files(tmp_path, capsys):
    good = _keras_file(tmp_path / "good.h5")
    assert main(["import-keras", str(good), "-o", str(tmp_path / "good.safetensors")]) == 0
    capsys.readouterr()
    for name, (h5, words) in _keras_cases(tmp_path).items():
        out = tmp_path / f"{h5.stem}.safetensors"
        rc = main(["import-keras", str(h5), "-o", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and words in err, f"{name}: {err}"
        assert not out.exists(), name


# --- no traceback, no silent garbage ----------------------------------------------------------

def test_zero_size_dimension_is_refused_and_folder_mode_goes_on(tiny_model, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _nifti(inputs / "a_good.nii.gz", _head())
    _nifti(inputs / "b_empty.nii.gz", np.zeros((24, 0, 22), np.float32))
    (inputs / "c_empty.nrrd").write_text(_nhdr(tmp_path / "h", None, sizes=(24, 0, 22)).read_text() + "\n")
    _nifti(inputs / "d_good.nii.gz", _head())
    rc, err = _segment(tiny_model, inputs, tmp_path / "out", capsys)
    assert rc == 1, err
    assert "b_empty.nii.gz: image has a zero-size dimension (shape (24, 0, 22))" in err, err
    assert "c_empty.nrrd: image has a zero-size or negative dimension (sizes (24, 0, 22))" in err, err
    assert "Traceback" not in err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a_good_synthseg.nii.gz", "d_good_synthseg.nii.gz"]


@pytest.mark.parametrize("crop", [["0"], ["-64"], ["64", "64"]])
def test_bad_crop_gets_a_message(tiny_model, tmp_path, capsys, crop):
    rc, err = _segment(tiny_model, _nifti(tmp_path / "scan.nii.gz", _head()), tmp_path / "seg.nii.gz", capsys,
                       "--crop", *crop)
    assert rc == 1 and "--crop takes one or three positive sizes" in err, err
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("key, value", [
    ("intensity_percentiles", [-5, 120]), ("intensity_percentiles", ["low", "high"]),
    ("intensity_percentiles", [99.5, 0.5]), ("target_resolution_mm", 0), ("target_resolution_mm", -1.0),
    ("target_resolution_mm", "1"), ("min_pad", 0), ("min_pad", 32.5), ("posterior_smoothing_sigma", "wide"),
    ("mask_threshold", 2.0), ("flip_averaging", "yes"), ("resample_tolerance_mm", float("nan"))])
def test_out_of_range_preprocessing_metadata(tmp_path, capsys, key, value):
    model = _model_file(tmp_path / "bad.safetensors", preprocessing=dict(PRE, **{key: value}))
    rc, err = _segment(model, _nifti(tmp_path / "scan.nii.gz", _head()), tmp_path / "seg.nii.gz", capsys)
    assert rc == 1 and f"preprocessing setting {key} = " in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("tensor, value", [("encoder.0.convs.0.conv.weight", float("nan")),
                                           ("decoder.0.bn.running_mean", float("inf")),
                                           ("encoder.1.bn.running_var", float("nan")),
                                           ("encoder.1.bn.running_var", -1.0)])
def test_nan_weights_with_a_valid_checksum_are_refused(tiny_model, tmp_path, capsys, tensor, value):
    torch.manual_seed(0)
    tensors = model_tensors(SynthSegUNet(TINY))
    tensors[tensor].view(-1)[0] = value
    model = _model_file(tmp_path / "nan.safetensors", tensors=tensors)
    image = _nifti(tmp_path / "scan.nii.gz", _head())
    out = tmp_path / "out"
    rc, err = _segment(model, image, out / "seg.nii.gz", capsys, "--vol", str(out / "vol.csv"))
    assert rc == 1 and f"tensor {tensor} holds" in err, err
    assert not _files(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_weight_check_finds_every_non_finite_value_and_no_other(dtype):
    big = torch.finfo(dtype).max
    assert weight_problem("w", torch.full((1000,), big, dtype=dtype)) is None  # finite, however large
    assert weight_problem("w", torch.tensor([-big, big, 0.5], dtype=dtype)) is None
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        t = torch.zeros(1000, dtype=dtype)
        t[17:17 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert weight_problem("w", t) == "tensor w holds NaN or infinite values"


def _non_finite_positions(tmp: Path) -> dict[str, Path]:
    data = _head()
    cases = {}
    img = nib.Nifti1Image(data, np.eye(4))
    affine = np.eye(4)
    affine[0, 3] = np.nan
    img.set_sform(affine, code=1)
    nib.save(img, str(tmp / "sform.nii.gz"))
    cases["sform"] = tmp / "sform.nii.gz"
    # nibabel rewrites the qform when saving: patch qoffset_x (bytes 268-271) of a plain .nii
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_sform(None, code=0)
    img.set_qform(np.eye(4), code=1)
    nib.save(img, str(tmp / "qform.nii"))
    raw = bytearray((tmp / "qform.nii").read_bytes())
    raw[268:272] = np.float32(np.inf).tobytes()
    (tmp / "qform.nii").write_bytes(bytes(raw))
    cases["qform"] = tmp / "qform.nii"
    nib.save(nib.MGHImage(data, np.eye(4)), str(tmp / "centre.mgh"))
    raw = bytearray((tmp / "centre.mgh").read_bytes())
    raw[78:82] = struct.pack(">f", float("nan"))  # c_r of the MGH header
    (tmp / "centre.mgz").write_bytes(gzip.compress(bytes(raw)))
    cases["MGZ centre"] = tmp / "centre.mgz"
    _raw(tmp / "scan.raw", data)
    cases["NRRD origin"] = _nhdr(tmp / "origin.nhdr", "scan.raw", origin="(nan,0,0)")
    return cases


def test_non_finite_position_is_refused(tiny_model, tmp_path, capsys):
    for name, path in _non_finite_positions(tmp_path).items():
        out = tmp_path / "out" / name.replace(" ", "_")
        rc, err = _segment(tiny_model, path, out / "seg.nii.gz", capsys)
        assert rc == 1 and "position (affine" in err and "NaN or infinite" in err, f"{name}: {err}"
        assert not _files(out), name


def test_leading_singleton_and_complex_images_are_refused(tiny_model, tmp_path, capsys):
    data = _head()
    series = _nifti(tmp_path / "series.nii.gz", data[None])  # (1, 24, 26, 22): 22 frames of 1x24x26
    complex_image = _nifti(tmp_path / "complex.nii.gz", (data + 1j * data).astype(np.complex64))
    for path, words in ((series, "has a single voxel along a spatial axis and 22 volumes"),
                        (complex_image, "complex-valued image (complex64)")):
        rc, err = _segment(tiny_model, path, tmp_path / "out" / f"{path.name}", capsys)
        assert rc == 1 and words in err, err
    assert not _files(tmp_path / "out")


SIGNAL_DRIVER = r"""
import contextlib, io, json, os, signal, sys, time
import SynthSegMONAILib.pipeline as pipeline
from SynthSegMONAILib.cli import main
original = pipeline.save_image
results = []
for signum, out in json.loads(sys.argv[1]):
    def save_then_signal(data, affine, header, path, dtype=None, signum=signum):
        original(data, affine, header, path, dtype)  # a temporary output now exists
        os.kill(os.getpid(), signum)
        time.sleep(30)
    pipeline.save_image = save_then_signal
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--i", sys.argv[2], "--o", out, "--model", sys.argv[3], "--post", out + "_post.nii.gz"])
    results.append({"rc": rc, "err": err.getvalue()})
print(json.dumps(results))
"""


def test_sigterm_and_sigint_remove_temporary_outputs(tiny_model, tmp_path):
    image = _nifti(tmp_path / "scan.nii.gz", _head())
    outs = {signal.SIGTERM: tmp_path / "term" / "seg.nii.gz", signal.SIGINT: tmp_path / "int" / "seg.nii.gz"}
    cases = json.dumps([[int(s), str(o)] for s, o in outs.items()])
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DRIVER, cases, str(image), str(tiny_model)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (signum, out), result in zip(outs.items(), json.loads(proc.stdout.splitlines()[-1])):
        assert result["rc"] == 128 + signum, result
        assert "Traceback" not in result["err"] and "interrupted" in result["err"], result
        assert _files(out.parent) == [], [p.name for p in _files(out.parent)]


def test_output_name_near_the_length_limit(tiny_model, tmp_path, capsys, monkeypatch):
    image = _nifti(tmp_path / "scan.nii.gz", _head())
    long_name = "s" * (255 - len(".nii.gz")) + ".nii.gz"  # exactly the limit: its temporary name is longer
    rc, err = _segment(tiny_model, image, tmp_path / long_name, capsys)
    assert rc == 0, err
    assert (tmp_path / long_name).exists()
    from SynthSegMONAILib.inference import SlabNetwork

    calls = []
    monkeypatch.setattr(SlabNetwork, "posteriors", lambda *a, **k: calls.append(1))
    rc, err = _segment(tiny_model, image, tmp_path / ("s" + long_name), capsys)
    assert rc == 1 and "over the file system's limit of 255" in err, err
    assert calls == []  # refused before the network ran


def test_checkpoints_load_without_unpickling(tmp_path):
    from SynthSegMONAITrainingLib.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    marker = tmp_path / "code_ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": {}, "step": 1, "x": Planted()}, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="holds objects other than tensors and plain data"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
             "history": [{"step": 1, "loss": np.float32(0.5)}], "step": 1}
    save_checkpoint(tmp_path / "good.pt", state)
    expected = (torch.rand(3), __import__("random").random())
    loaded = torch.load(tmp_path / "good.pt", weights_only=True)
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and __import__("random").random() == expected[1]
    assert loaded["history"] == [{"step": 1, "loss": 0.5}]
    with pytest.raises(TypeError, match="only tensors and plain data"):
        save_checkpoint(tmp_path / "bad.pt", {"x": Planted()})


def test_listings_check_tensor_shapes_against_the_configuration(tiny_model, tmp_path, monkeypatch, capsys):
    from SynthSegMONAILib.model_file import read_model_info
    from SynthSegMONAISlicerLib.errors import SegmentationError
    from SynthSegMONAISlicerLib.models import add_model_file

    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(tiny_model.read_bytes())
    mismatched = _model_file(folder / "mismatched.safetensors", network=dict(TINY.to_dict(), features=8))
    monkeypatch.setenv("SYNTHSEG_MONAI_MODELS", str(folder))
    monkeypatch.setenv("SYNTHSEG_MONAI_HOME", str(tmp_path / "home"))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("good\t33 labels") for line in lines), lines
    bad = next(line for line in lines if line.startswith("mismatched\t"))
    assert "INVALID" in bad and "expected (8, 1, 3, 3, 3)" in bad, bad
    with pytest.raises(Exception, match="expected"):
        read_model_info(mismatched)
    with pytest.raises(SegmentationError, match="expected"):
        add_model_file(mismatched)
    assert add_model_file(folder / "good.safetensors") == "good"
