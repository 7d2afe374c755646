"""The allocator tuning a segmenter applies (Linux with glibc): freed slabs kept in the heap, NumPy's
arrays left out of transparent huge pages, whose refaults cost seconds of system time, and the
heap's fragmentation handed back near the peak."""

from __future__ import annotations

import platform

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_tiny_model, random_unet

from SynthSegMONAILib import allocator
from SynthSegMONAILib.allocator import (
    FreedMemoryBound,
    discard_pages,
    keep_freed_memory,
    set_numpy_huge_pages,
)
from SynthSegMONAILib.inference import SlabNetwork
from SynthSegMONAILib.network import UNetConfig
from SynthSegMONAILib.pipeline import Outputs, Segmenter

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the tuning applies to glibc's allocator only")


def test_segmenter_turns_numpy_huge_pages_off_only_when_it_tunes_the_allocator(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.safetensors")
    before = set_numpy_huge_pages(True)
    if before is None:
        pytest.fail("this NumPy has no huge-page switch: the allocator tuning cannot apply it")
    try:
        Segmenter(model, device="cpu", tune_allocator=False)
        assert set_numpy_huge_pages(True) is True  # left as it was
        seg = Segmenter(model, device="cpu")
        assert seg.tune_allocator
        assert set_numpy_huge_pages(True) is False  # turned off by the tuning
    finally:
        set_numpy_huge_pages(before)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _fragment(mib: int) -> None:
    """Leave ``mib`` MiB of touched, freed memory inside the heap (a live block above it)."""
    block = np.ones(mib << 18, dtype=np.float32)
    pin = np.ones(1 << 16, dtype=np.float32)
    del block
    _fragment.pins.append(pin)


_fragment.pins = []


def test_freed_memory_bound_hands_back_fragmentation_near_the_peak_only(monkeypatch):
    assert keep_freed_memory()  # large blocks then come from the heap, and stay there when freed
    bound = FreedMemoryBound(allowance=32 << 20)
    assert bound.active
    bound.release()
    _fragment(48)  # one slab's temporaries: reused by the next slabs, kept
    bound.check()
    assert bound.releases == 0
    # far under the peak, fragmentation stays (handing it back would cost refaults for nothing)
    monkeypatch.setattr(allocator, "_high_water", lambda: _rss() + (1 << 40))
    _fragment(96)
    bound.check()
    assert bound.releases == 0
    # at the peak, it goes back to the system
    monkeypatch.undo()
    before = _rss()
    bound.check()
    assert bound.releases == 1
    assert before - _rss() > 64 << 20
    bound.check()  # nothing more to hand back
    assert bound.releases == 1


def test_discarded_pages_leave_the_resident_memory_and_the_rest_of_the_tensor_intact():
    t = torch.ones(64 << 18)  # 64 MiB
    before = _rss()
    n = discard_pages(t[: 32 << 18])
    assert n >= (32 << 20) - 8192
    assert before - _rss() >= n - (4 << 20)
    assert torch.all(t[(32 << 18) + 1024:] == 1)
    assert discard_pages(t[::2]) == 0  # not contiguous: left alone


def test_streamed_network_with_the_memory_bound_gives_the_same_posteriors():
    """The pipeline's memory handling (touched posteriors, freed memory bounded after each slab,
    consumed rows of the decoder's inputs discarded) changes no value."""
    model = random_unet(UNetConfig(levels=3, features=8, out_channels=5), seed=4)
    x = torch.randn(48, 40, 40)
    flip = np.array([0, 2, 1, 4, 3])
    plain = SlabNetwork(model, slab_budget_mb=1).posteriors(x, 0.5, flip)
    net = SlabNetwork(model, slab_budget_mb=1)
    bound = FreedMemoryBound(allowance=0)
    discarded = []
    net.between_stages, net.between_slabs, net.touch_buffers = bound.release, bound.check, True
    net.discard_pages = lambda t: discarded.append(discard_pages(t)) or discarded[-1]
    untouched = []
    net.untouched = lambda delta: (bound.untouched(delta), untouched.append(bound._untouched))
    assert torch.equal(net.posteriors(x, 0.5, flip), plain)
    assert sum(discarded) > 0  # rows were discarded, and no later row read them
    # the skip buffers were counted unwritten when made, and every row of them was then written
    assert max(untouched) > 0 and untouched[-1] == 0


def test_segmenting_with_the_allocator_tuning_gives_the_same_outputs(tmp_path):
    model = make_tiny_model(tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    image = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((40, 48, 36)).astype(np.float32), np.eye(4)), image)
    results = {}
    for tuned in (False, True):
        seg = Segmenter(model, device="cpu", tune_allocator=tuned)
        assert seg.network.touch_buffers is tuned
        out = Outputs(segmentation=tmp_path / f"seg{tuned}.nii.gz", posteriors=tmp_path / f"post{tuned}.nii.gz")
        row = seg.segment(image, out).volume_row
        results[tuned] = (np.asarray(nib.load(out.segmentation).dataobj),
                          np.asarray(nib.load(out.posteriors).dataobj), row)
    assert np.array_equal(results[True][0], results[False][0])
    assert np.array_equal(results[True][1], results[False][1])
    assert results[True][2] == results[False][2]
