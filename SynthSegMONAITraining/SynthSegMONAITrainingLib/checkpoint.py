"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, strings, numbers,
booleans, None; random states as tensors and lists), so it is read with
``torch.load(weights_only=True)``: a ``checkpoint.pt`` planted in an output folder cannot run
code when a run is resumed from it.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Random states of Python (as a list), PyTorch CPU and CUDA (tensors)."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value, where: str = "state"):
    """``value`` as tensors and plain data (NumPy values become tensors or Python numbers);
    TypeError for anything else, which ``weights_only`` loading would refuse."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        items = ((k, plain(v, f"{where}[{k!r}]")) for k, v in value.items())
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}: only tensors and plain data "
                    "can be saved (checkpoints are read without unpickling objects)")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` (made :func:`plain`) with torch.save to a temporary file, fsync, then
    rename over ``path``."""
    path = Path(path)
    state = plain(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, never unpickling other objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower().replace("_", " "):
            raise RuntimeError(f"checkpoint {path} holds objects other than tensors and plain data; refused, "
                               "as reading it could run code (a checkpoint of this program never does: "
                               "delete it, or start the run in a new folder)") from e
        raise RuntimeError(f"checkpoint {path} cannot be read: {e}") from e
