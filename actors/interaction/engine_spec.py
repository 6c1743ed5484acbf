"""`EngineSpec`: which engine an interaction actor builds, and where.

`family` "interplay" is the built-in model (models/engine.py: a preset or a checkpoint directory);
"moshi" a Moshi-family checkpoint directory in Kyutai's layout at `path` (models/moshi/: Moshi,
PersonaPlex, Hibiki), ticking in `frames_per_tick` Mimi frames of 80 ms. Built by
`actors.interaction.interaction.Interaction` in its own process, so an actor's engine lands on the
actor's GPU; `tick_ms` reads the model's tick without loading its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.config import InteractionConfig
    from protocols.ports import Engine


@dataclass(frozen=True)
class EngineSpec:
    """A preset or a checkpoint directory; `device` "auto" is CUDA when present."""

    preset: str = "tiny"
    checkpoint: str | None = None
    device: str = "auto"
    max_sessions: int = 16
    onset_margin: float | None = None  # None: the checkpoint's calibrated one (0 for random weights)
    family: str = "interplay"
    path: str | None = None  # family "moshi": the checkpoint directory
    frames_per_tick: int = 1  # family "moshi": Mimi frames (80 ms) a tick
    # family "moshi": temperature / top_k / temperature_text / top_k_text; None: the engine's defaults
    sampling: dict[str, Any] | None = field(default=None, hash=False)

    def describe(self) -> str:
        if self.family == "moshi":
            drawn = "".join(f", {k} {v}" for k, v in (self.sampling or {}).items())
            return f"Moshi-family {self.path}{drawn}"
        return self.checkpoint or self.preset

    def tick_ms(self) -> int:
        """The model's tick length, read without loading its weights (a Moshi-family directory
        is checked file by file first: `CheckpointError` says what is wrong)."""
        if self.family == "moshi":
            from models.moshi.checkpoint import read_checkpoint
            from models.moshi.engine import FRAME_MS

            read_checkpoint(self.path or "")
            return FRAME_MS * self.frames_per_tick
        return self.model_config().tick_ms

    def model_config(self) -> "InteractionConfig":
        """The model's `InteractionConfig` (its tick length, shapes), read without building it."""
        if self.checkpoint:
            from models.checkpoint import load_config

            return load_config(self.checkpoint)
        from models.config import InteractionConfig

        return InteractionConfig.preset(self.preset)

    def build(self) -> "Engine":
        import torch

        from models.checkpoint import load_checkpoint, onset_margin
        from models.engine import StreamingEngine

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.family == "moshi":
            from models.moshi.engine import MoshiEngine

            return MoshiEngine(self.path or "", max_sessions=self.max_sessions, frames_per_tick=self.frames_per_tick, device=device,
                               **(self.sampling or {}))
        source = load_checkpoint(self.checkpoint, device=device) if self.checkpoint else self.preset
        return StreamingEngine(source, max_sessions=self.max_sessions, device=device,
                               onset_margin=onset_margin(self.checkpoint, self.onset_margin))
