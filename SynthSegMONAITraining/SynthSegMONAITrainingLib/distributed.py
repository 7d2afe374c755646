"""torch.distributed the PyTorch way: torchrun's environment, one process per device.

``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun, or by hand) decide whether the run
is distributed. NCCL on GPUs, gloo on CPU; every collective has a timeout so that a rank that
dies or stalls ends the run with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{local_rank}"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("training.device asks for CUDA but no GPU is available")
        torch.cuda.set_device(device)
    return device


def setup(device: str = "auto", backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, dev)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (returns a new tensor)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor)."""
    t = t.detach().clone()
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Average floating-point buffers (BatchNorm running statistics) so every rank holds the same."""
    if not info.distributed:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b.data, op=dist.ReduceOp.SUM)
            b.data /= info.world_size


def all_ok(ok: bool, info: DistInfo) -> bool:
    """True when every rank reports ``ok`` (used before writing shared files)."""
    if not info.distributed:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=info.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def cleanup(info: DistInfo) -> None:
    """Destroy the process group after a successful run."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def abort(info: DistInfo, message: str, code: int = 1) -> None:
    """End this rank at once after an error, without waiting on other ranks.

    Waiting in a collective or in ``destroy_process_group`` could hang when a peer is gone, so
    the process exits directly; torchrun then stops the remaining ranks.
    """
    prefix = f"[rank {info.rank}] " if info.distributed else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if info.distributed:
        os._exit(code)
