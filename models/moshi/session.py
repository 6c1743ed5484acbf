"""`MoshiSession`: the host-side part of one session's state in a `MoshiEngine`.

The tensors live in the engine's batch row `row`; here are the values that are not tensors: the
seed and the 80 ms frames stepped (together they key the session's sampling), the last seq
stepped, and the text tokens queued to enter the model's own text stream (background updates;
see `MoshiEngine.push_update`). `export` / `restore` carry them as plain values.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class MoshiSession:
    sid: str
    seed: int
    row: int
    last_seq: int | None = None
    frames: int = 0
    forced_text: deque[int] = field(default_factory=deque)

    def export(self) -> dict:
        return {"seed": self.seed, "last_seq": self.last_seq, "frames": self.frames, "forced_text": list(self.forced_text)}

    @classmethod
    def restore(cls, sid: str, row: int, d: dict) -> "MoshiSession":
        return cls(sid, int(d["seed"]), row, d["last_seq"], int(d["frames"]), deque(int(t) for t in d["forced_text"]))
