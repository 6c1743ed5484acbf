"""One batch row of the `moshi` package's streaming state, read out and written back.

A streaming module of the `moshi` package (LMGen, the LM's transformer, Mimi's convolutions and
transformers) keeps its state in `State` dataclasses whose tensors lead with the batch dimension,
except a `RingKVCache`, whose `cache` is (2, B, heads, capacity, dim). `row_tensors` lists every
such tensor under a stable name with the axis its rows are on; `export_row` / `load_row` copy one
row out as numpy (bfloat16 as float32) and back. The package reassigns some of these tensors as it
steps (LMGen's `offsets`), so they are looked up afresh each time, never cached.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

SKIP = {"exec_mask", "initial"}  # the execution mask is set every step; LMGen's initial token is a constant


def row_tensors(module) -> dict[str, tuple[torch.Tensor, int]]:
    """name -> (tensor, batch axis) for every per-row tensor in `module`'s streaming state."""
    from moshi.modules.transformer import RingKVCache

    out: dict[str, tuple[torch.Tensor, int]] = {}
    for name, state in module.get_streaming_state().items():
        if state is None:
            continue
        b = state.batch_size
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            key = f"{name}.{f.name}" if name else f.name
            if isinstance(v, RingKVCache):
                out[key + ".cache"] = (v.cache, 1)
                if v.end_offset.shape[0] == b:
                    out[key + ".end_offset"] = (v.end_offset, 0)
            elif f.name not in SKIP and isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
                out[key] = (v, 0)
    return out


def export_row(module, row: int) -> dict[str, np.ndarray]:
    out = {}
    for k, (t, axis) in row_tensors(module).items():
        r = t.select(axis, row)
        out[k] = (r.float() if r.dtype == torch.bfloat16 else r).cpu().numpy().copy()
    return out


def load_row(module, row: int, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` (an `export_row`) into `row`; raises ValueError, changing nothing, if the
    names or shapes differ."""
    tensors = row_tensors(module)
    if set(arrays) != set(tensors):
        diff = sorted(set(arrays) ^ set(tensors))[:4]
        raise ValueError(f"state does not fit this model (differs in {diff})")
    for k, (t, axis) in tensors.items():
        if tuple(np.shape(arrays[k])) != tuple(t.select(axis, row).shape):
            raise ValueError(f"state {k!r} has shape {np.shape(arrays[k])}, this model holds {tuple(t.select(axis, row).shape)}")
    for k, (t, axis) in tensors.items():
        t.select(axis, row).copy_(torch.as_tensor(np.asarray(arrays[k])))
