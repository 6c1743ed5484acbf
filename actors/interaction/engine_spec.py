"""`EngineSpec`: which engine an interaction actor builds, and where.

Built by `actors.interaction.interaction.Interaction` in its own process, so an actor's engine
lands on the actor's GPU; `model_config` reads the model's shapes and tick without building it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
        source = load_checkpoint(self.checkpoint, device=device) if self.checkpoint else self.preset
        return StreamingEngine(source, max_sessions=self.max_sessions, device=device,
                               onset_margin=onset_margin(self.checkpoint, self.onset_margin))
