"""Shared by the model/engine tests (and bench/engine.py): a very small config, deterministic input
chunks, an engine that keeps what each tick saw, a way to put a session hours in at no cost, and
the engine tests' small engines and output comparison."""

from __future__ import annotations

import numpy as np
import torch

from models.config import PRESETS, InteractionConfig
from models.engine import StreamingEngine
from protocols.chunks import SAMPLE_RATE, InputChunk, OutputChunk

# Same design as `tiny`, shrunk so tests are fast, with a window short enough to wrap the ring
# many times in a few dozen ticks (a tick holds 11..23 tokens here).
MICRO = PRESETS["tiny"].replace(
    name="micro", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=2,
    d_ff=64, d_ff_shared=32, window=24, n_sink=4, dmel_dim=32, frame_size=80, stem_dims=(8, 16), text_per_tick=4,
    bg_per_tick=3, flow_dim=48, flow_layers=1, flow_steps=3, quiet_prior=0.0,  # varied controls and text: stronger checks
)


def micro(**changes) -> InteractionConfig:
    return MICRO.replace(**changes) if changes else MICRO


def make_chunk(sid: str, k: int, seed: int, frame_size: int | None = 80, text: str = "", video_every: int = 3,
               tick_ms: int = 200, forced: str | None = None) -> InputChunk:
    """Tick k of session `sid`: noisy tone audio, a frame every `video_every` ticks."""
    rng = np.random.default_rng([seed, k])
    n = SAMPLE_RATE * tick_ms // 1000
    t = np.arange(n) / SAMPLE_RATE + k * tick_ms / 1000
    audio = (3000 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + rng.normal(0, 800, n)).astype(np.int16)
    frame = None
    if frame_size and video_every and k % video_every == 0:
        frame = rng.integers(0, 256, (frame_size, frame_size, 3), dtype=np.uint8)
    return InputChunk(sid, k, k * tick_ms / 1000, audio, frame=frame, text=text, forced=forced)


def step_ok(engine: StreamingEngine, chunks: list[InputChunk]):
    """Step and insist nothing was refused."""
    outs, errors = engine.step(chunks)
    assert not errors, errors
    return outs


class TracingEngine(StreamingEngine):
    """Keeps, per session, every tick's model inputs and predictions (`trace[sid]`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trace: dict[str, list[dict]] = {}

    def execute(self, sessions, chunks, inputs):
        d = super().execute(sessions, chunks, inputs)
        for i, s in enumerate(sessions):
            self.trace.setdefault(s.sid, []).append({
                "inputs": inputs.row(i), "noise": d.noise[i].cpu(), "ctrl_logits": d.ctrl_logits[i].cpu(),
                "text_logits": d.text_logits[i].cpu(), "mel": d.mel[i].cpu(), "spoken": d.spoken[i].cpu(),
                "ctrl": int(d.ctrl[i]), "text": d.text[i].cpu(),
            })
        return d


def fast_forward(engine: StreamingEngine, session_id: str, ticks: int, tokens_per_tick: int, generator: torch.Generator | None = None) -> None:
    """Put the session `ticks` micro-turns in, as if each had had `tokens_per_tick` tokens, with
    random keys/values in every slot such a session would occupy. Costs no forward passes."""
    cfg, dev = engine.cfg, engine.device
    state = engine.rows.of(engine.sessions.index(session_id))
    n_tok = ticks * tokens_per_tick
    with torch.inference_mode():
        live = torch.arange(max(0, n_tok - cfg.ring), n_tok, device=dev)
        live = torch.cat([torch.arange(min(cfg.n_sink, n_tok), device=dev), live[live >= cfg.n_sink]])
        slots = torch.where(live < cfg.n_sink, live, cfg.n_sink + (live - cfg.n_sink) % cfg.ring)
        state["slot_pos"].fill_(-1)
        state["slot_pos"][slots] = live
        for name in ("k", "v"):
            shape = state[name].shape
            state[name].copy_(torch.randn(shape, generator=generator, dtype=torch.float32).to(dev, engine.dtype))
        state["pos"].fill_(n_tok)
        state["tick"].fill_(ticks)


SEEDS = {"a": 0, "b": 1, "c": 2, "d": 3, "x": 4}  # the input seed of each session name the engine tests use
# float32 matmuls over different row counts may differ in the last bits, and an untrained flow
# head speaks loudly, where the vocoder's exp() turns that into a few LSB. Text, controls and the
# dMel codes fed back must match exactly.
FLOAT_LSB = 64


def chunks_at(sids, k, **kw):
    return [make_chunk(s, k, SEEDS[s], **kw) for s in sids]


def build_engine(max_sessions=4, sessions=("a",), cls=StreamingEngine, **kw) -> StreamingEngine:
    torch.manual_seed(0)  # same weights in every engine of a test
    eng = cls(micro(**kw), max_sessions=max_sessions)
    for s in sessions:
        eng.add_session(s)
    return eng


def assert_same(o1: OutputChunk, o2: OutputChunk, lsb: int = 0) -> None:
    assert (o1.session_id, o1.seq, o1.text, o1.controls) == (o2.session_id, o2.seq, o2.text, o2.controls)
    diff = np.abs(o1.audio.astype(np.int32) - o2.audio.astype(np.int32))
    assert diff.max() <= lsb and diff.mean() < max(lsb, 1) / 16
