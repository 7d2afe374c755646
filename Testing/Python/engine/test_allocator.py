"""The allocator tuning a segmenter applies (Linux with glibc): freed slabs kept in the heap, and
NumPy's arrays left out of transparent huge pages, whose refaults cost seconds of system time."""

from __future__ import annotations

import platform

import pytest
from conftest import make_tiny_model

from SynthSegMONAILib.allocator import set_numpy_huge_pages
from SynthSegMONAILib.pipeline import Segmenter

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
