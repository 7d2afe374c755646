"""The network's arithmetic precision: float32 (exact, the default) or bfloat16.

bfloat16 halves the convolutions' time only where the hardware multiplies bf16 natively
(x86 CPUs with AVX512_BF16 or AMX, recent GPUs); elsewhere oneDNN emulates it, slower than
float32, so it is refused there. ``auto`` picks bfloat16 where it is native, float32
elsewhere. Its accuracy was measured against float32 on real scans (README, *Speed and
memory*).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import OptionError

PRECISIONS = ("float32", "bfloat16", "auto")
#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still allow its native bf16 kernels
BF16_ISAS = ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_1_512_AMX", "AVX512_CORE_AMX",
             "AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16", "ALL", "DEFAULT")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16_cpu(flags: set[str] | None = None, isa_cap: str | None = None) -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU: the CPU has AVX512_BF16 or
    AMX-BF16, and ``ONEDNN_MAX_CPU_ISA`` (``isa_cap``) does not cap it below them."""
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")) if isa_cap is None \
        else isa_cap
    if cap and cap.upper() not in BF16_ISAS:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 is native on ``device``."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and native_bf16_cpu()


def network_dtype(precision: str, device: torch.device, native: bool | None = None) -> torch.dtype:
    """The dtype the network runs in for ``--precision`` on ``device``; bfloat16 is refused
    where it is not native (``native`` overrides the detection, for tests)."""
    if precision not in PRECISIONS:
        raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "float32":
        return torch.float32
    native = native_bf16(device) if native is None else native
    if precision == "auto":
        return torch.bfloat16 if native else torch.float32
    if not native:
        where = ("this GPU has no native bfloat16 arithmetic" if device.type == "cuda" else
                 "this CPU has no native bfloat16 instructions (AVX512_BF16 or AMX), or ONEDNN_MAX_CPU_ISA "
                 "caps them")
        raise OptionError(f"--precision bfloat16: {where}, so bfloat16 would be slower than float32; "
                          "use float32 (or auto)")
    return torch.bfloat16
