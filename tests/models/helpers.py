"""Shared by the model/engine tests: a very small config and deterministic input chunks."""

from __future__ import annotations

import numpy as np

from models.config import PRESETS, InteractionConfig
from protocols.chunks import CHUNK_SAMPLES, InputChunk

# Same design as `tiny`, shrunk so tests are fast, with a window short enough to wrap the ring
# many times in a few dozen ticks (a tick holds 11..23 tokens here).
MICRO = PRESETS["tiny"].replace(
    name="micro", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=2,
    d_ff=64, d_ff_shared=32, window=24, n_sink=4, dmel_dim=32, frame_size=80, stem_dims=(8, 16), text_per_tick=4,
    bg_per_tick=3, flow_dim=48, flow_layers=1, flow_steps=3, quiet_prior=0.0,  # varied controls and text: stronger checks
)


def micro(**changes) -> InteractionConfig:
    return MICRO.replace(**changes) if changes else MICRO


def make_chunk(sid: str, k: int, seed: int, frame_size: int | None = 80, text: str = "", video_every: int = 3) -> InputChunk:
    """Tick k of session `sid`: noisy tone audio, a frame every `video_every` ticks."""
    rng = np.random.default_rng([seed, k])
    t = np.arange(CHUNK_SAMPLES) / 16_000 + k * 0.2
    audio = (3000 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + rng.normal(0, 800, CHUNK_SAMPLES)).astype(np.int16)
    frame = None
    if frame_size and video_every and k % video_every == 0:
        frame = rng.integers(0, 256, (frame_size, frame_size, 3), dtype=np.uint8)
    return InputChunk(sid, k, k * 0.2, audio, frame=frame, text=text)
