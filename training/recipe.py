"""`Recipe`: everything that decides the trained weights, and the learning-rate schedule.

AdamW at `lr`, linear warmup over `warmup` steps then cosine decay to `min_lr_frac`; a resumed run
must have the same recipe (`train_state.same_recipe`), its `steps` aside.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (paths and worker layout aside)."""

    preset: str = "tiny"
    data: str = "data/synth"
    n_train: int = 1200  # dialogues generated when `data` is absent
    n_heldout: int = 120
    steps: int = 1600
    batch: int = 8  # dialogue windows per step, over all workers
    crop_s: tuple[float, float] = (10.0, 20.0)
    from_start: float = 0.25  # share of windows starting at the dialogue's first tick
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    self_feed: float = 0.75  # share of windows that hear the model's own speech fed back (feed_back_own_speech)
    self_feed_from: int = 300  # from this step on, once its speech head says something
    self_feed_controls_from: int = 0  # from this step on (0: never), those windows also hear the controls it chose (greedy, as served)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))
