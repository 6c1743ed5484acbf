"""A streaming session's state, declared once and handled generically.

A session's state has two parts:
- `Session`: host-side values (id, seed, row, last seq, queued text and background tokens, the
  decoder streaming its text out);
- one row in each of the engine's pre-sized tensors, held by `Rows` and declared by `Row` specs
  (the engine declares the KV cache, its slot positions and the next position; the input builder
  its clock, dMel context and fed-back outputs; the vocoder its phase and overlap tail).

Adding, removing (row compaction), committing a tick, exporting and importing all go through
these two, so a new piece of state is declared in exactly one place. An exported state is plain
numpy arrays and Python values (picklable); floating tensors travel as float32 or float64, which
holds bf16 and fp16 exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from models.tokenizer import IncrementalDecoder
from protocols.chunks import ProtocolError


@dataclass(frozen=True)
class Row:
    """One per-session tensor: a session's shape and dtype, a new session's value, and where the
    session axis sits in the batched tensor (1 for the layer-major KV cache, else 0)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fresh: float | int | torch.Tensor = 0
    axis: int = 0


class Rows:
    """Every per-session tensor of an engine, pre-sized for `capacity` sessions and never
    reallocated. Live sessions occupy rows [0, n), so a tick reads contiguous views."""

    def __init__(self, spec: dict[str, Row], capacity: int, device: torch.device):
        self.spec, self.capacity = dict(spec), capacity
        self.tensors: dict[str, torch.Tensor] = {}
        for name, r in self.spec.items():
            shape = (*r.shape[: r.axis], capacity, *r.shape[r.axis :])
            self.tensors[name] = torch.zeros(shape, dtype=r.dtype, device=device)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def live(self, n: int) -> dict[str, torch.Tensor]:
        """Views of rows [0, n) of every tensor."""
        return {name: t.narrow(self.spec[name].axis, 0, n) for name, t in self.tensors.items()}

    def of(self, row: int) -> dict[str, torch.Tensor]:
        """Views of one session's row of every tensor."""
        return {name: t.select(self.spec[name].axis, row) for name, t in self.tensors.items()}

    def reset(self, row: int) -> None:
        for name, view in self.of(row).items():
            fresh = self.spec[name].fresh
            view.copy_(fresh) if isinstance(fresh, torch.Tensor) else view.fill_(fresh)

    def move(self, src: int, dst: int) -> None:
        for dst_view, src_view in zip(self.of(dst).values(), self.of(src).values()):
            dst_view.copy_(src_view)

    def write(self, n: int, values: dict[str, torch.Tensor]) -> None:
        """Commit new values for rows [0, n) of the named tensors."""
        live = self.live(n)
        for name, v in values.items():
            live[name].copy_(v)

    def export(self, row: int) -> dict[str, np.ndarray]:
        out = {}
        for name, view in self.of(row).items():
            if view.is_floating_point() and view.dtype not in (torch.float32, torch.float64):
                view = view.float()
            out[name] = view.cpu().numpy().copy()
        return out

    def load(self, row: int, arrays: dict[str, np.ndarray]) -> None:
        """Fill one row from `export` output; every tensor must be there, in its shape."""
        views = self.of(row)
        if set(arrays) != set(views):
            raise ProtocolError(f"session state holds {sorted(arrays)}, this engine needs {sorted(views)}", "invalid_state", "state")
        for name, view in views.items():
            a = np.asarray(arrays[name])
            if a.shape != tuple(view.shape):
                raise ProtocolError(f"session state {name!r} has shape {a.shape}, this engine needs {tuple(view.shape)}", "invalid_state", "state")
            view.copy_(torch.from_numpy(a).to(view.device, view.dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class TextQueues:
    """One session's typed-text and background-update tokens not yet entered."""

    text: deque = field(default_factory=deque)
    bg: deque = field(default_factory=deque)


@dataclass
class Session:
    """Host-side state of one session; `row` is its row in `Rows`."""

    sid: str
    seed: int
    row: int
    last_seq: int | None = None
    queues: TextQueues = field(default_factory=TextQueues)
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)

    def export(self) -> dict:
        return {"seed": self.seed, "last_seq": self.last_seq, "text_queue": list(self.queues.text),
                "bg_queue": list(self.queues.bg), "decoder": self.decoder.state()}

    @classmethod
    def restore(cls, sid: str, row: int, state: dict) -> "Session":
        queues = TextQueues(deque(state["text_queue"]), deque(state["bg_queue"]))
        return cls(sid, int(state["seed"]), row, state["last_seq"], queues, IncrementalDecoder.from_state(state["decoder"]))
