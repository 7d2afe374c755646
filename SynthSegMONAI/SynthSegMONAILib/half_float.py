"""Float16 arrays (the posteriors' storage with ``--precision bfloat16``) to and from float32.

NumPy converts half-precision values one at a time; PyTorch uses the CPU's vector instructions
and is several times faster, so conversions go through it. PyTorch is imported on first use:
the modules that call these also serve code that has no PyTorch (the Slicer side).
"""

from __future__ import annotations

import numpy as np


def as_float32(block: np.ndarray) -> np.ndarray:
    """``block`` in float32: itself when it is float32, otherwise a C-ordered float32 copy of it,
    values in the same logical order (views with reversed axes included)."""
    if block.dtype == np.float32:
        return block
    if block.dtype != np.float16:
        return np.array(block, dtype=np.float32, order="C")
    import torch

    reversed_axes = tuple(i for i, s in enumerate(block.strides) if s < 0)
    if reversed_axes:  # PyTorch takes no negative strides: convert the forward view, reverse back
        forward = torch.from_numpy(np.flip(block, reversed_axes))
        converted = forward.to(torch.float32, memory_format=torch.contiguous_format).numpy()
        return np.ascontiguousarray(np.flip(converted, reversed_axes))
    return torch.from_numpy(block).to(torch.float32, memory_format=torch.contiguous_format).numpy()


def store(block: np.ndarray, values: np.ndarray) -> None:
    """``block[...] = values``, through PyTorch when ``block`` is float16 and ``values`` float32."""
    if block.dtype != np.float16 or values.dtype != np.float32 or any(s < 0 for s in block.strides):
        block[...] = values
        return
    import torch

    torch.from_numpy(block).copy_(torch.from_numpy(values))
