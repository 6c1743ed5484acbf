"""`InteractionConfig`: every shape of the interaction model, with named presets.

One code path serves all presets: `tiny` runs several sessions in real time on two CPU cores,
`small` is a larger CPU model, and `gpu12b` is the ~12B-active mixture of experts meant for one
H100 (benchmarked with random weights). A config round-trips through `to_dict`/`from_dict`, which
is what a checkpoint's config.json holds.

`tick_ms` is the micro-turn a model is trained at and the only place it is set: the audio per
chunk (`samples_per_tick`), the dMel frames per tick and the clock's seconds all derive from it,
and serving reads it from here (`StreamingEngine.tick_ms`, then `protocols.clock.TickClock`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from protocols.chunks import CONTROLS, SAMPLE_RATE, ProtocolError
from protocols.clock import HOP_MS, check_tick_ms


@dataclass(frozen=True)
class InteractionConfig:
    name: str = "custom"
    # Transformer.
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512  # hidden width of one routed expert (SwiGLU)
    d_ff_shared: int = 0  # hidden width of an always-on shared expert; 0 for none
    rope_theta: float = 100_000.0
    norm_eps: float = 1e-5
    # Streaming memory: the first n_sink tokens stay forever, then a window of recent tokens.
    window: int = 768
    n_sink: int = 32
    # The micro-turn: a whole number of 25 ms dMel hops (8 frames at 200 ms).
    tick_ms: int = 200
    # Audio in and out: dMel, 80 bins x 16 levels, one frame per 25 ms hop.
    n_mels: int = 80
    mel_levels: int = 16
    dmel_dim: int = 128  # width of the per-bin code embeddings before the projection to d_model
    mel_lo: float = -5.0  # log-mel range used to normalise the flow head's targets
    mel_hi: float = 6.5
    mel_floor: float = -11.5129  # ln(1e-5): DMel's silence
    # Video: square frames of frame_size pixels tiled into patch x patch patches, hMLP stem.
    frame_size: int = 160
    patch: int = 40
    stem_dims: tuple[int, int] = (32, 96)
    # Text: byte-level; typed text and background updates enter at most this many tokens a tick.
    vocab_size: int = 272  # >= ByteTokenizer().vocab_size (268), rounded up
    text_per_tick: int = 8
    bg_per_tick: int = 8
    max_queued_tokens: int = 65_536  # per stream and session; beyond this input is refused
    text_out: int = 4  # text tokens predicted in parallel per micro-turn
    # Flow-matching audio head.
    flow_dim: int = 256
    flow_layers: int = 2
    flow_steps: int = 4
    # Training.
    init_std: float = 0.02
    quiet_prior: float = 2.0  # initial logit bias toward "silent" and an empty text: untrained models listen
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        check_tick_ms(self.tick_ms)
        if self.tick_ms % HOP_MS:
            raise ProtocolError(f"tick_ms must be a whole multiple of the {HOP_MS} ms dMel hop, got {self.tick_ms}", "invalid_value", "tick_ms")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.frame_size % self.patch or self.patch % 8:
            raise ValueError("frame_size must be a multiple of patch, and patch a multiple of 8 (hMLP blocks)")
        if self.window < self.max_tokens_per_tick:
            raise ValueError(f"window={self.window} must hold at least one tick ({self.max_tokens_per_tick} tokens)")
        object.__setattr__(self, "stem_dims", tuple(self.stem_dims))

    # Derived shapes.
    @property
    def tick_s(self) -> float:
        return self.tick_ms / 1000

    @property
    def frames_per_tick(self) -> int:
        """dMel frames (25 ms hops) per micro-turn, in and out."""
        return self.tick_ms // HOP_MS

    @property
    def samples_per_tick(self) -> int:
        """16 kHz samples in one chunk's audio (3,200 at 200 ms)."""
        return SAMPLE_RATE * self.tick_ms // 1000

    @property
    def n_patches(self) -> int:
        return (self.frame_size // self.patch) ** 2

    @property
    def max_tokens_per_tick(self) -> int:
        """time marker + audio frames + video patches + typed text + background + OUT query."""
        return 1 + self.frames_per_tick + self.n_patches + self.text_per_tick + self.bg_per_tick + 1

    @property
    def ring(self) -> int:
        """Ring slots: the window plus one tick, so a tick's writes never evict what it still reads."""
        return self.window + self.max_tokens_per_tick

    @property
    def cache_len(self) -> int:
        return self.n_sink + self.ring

    @property
    def n_controls(self) -> int:
        return len(CONTROLS)

    def tokens_per_tick(self, video: bool) -> int:
        """Tokens a quiet micro-turn adds (no typed text or background update): time marker,
        audio frames, video patches when a frame came, OUT query."""
        return 1 + self.frames_per_tick + (self.n_patches if video else 0) + 1

    def horizon_s(self, video: bool) -> float:
        """Seconds of recent conversation the model sees through its window, with audio only or
        a frame every tick (typed text and updates shorten it). The session's first `n_sink`
        tokens stay visible besides."""
        return self.window / self.tokens_per_tick(video) * self.tick_s

    # Serialisation.
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stem_dims"] = list(self.stem_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InteractionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "InteractionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "InteractionConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


PRESETS: dict[str, InteractionConfig] = {
    # Real time on 2 CPU cores: sized by measurement (bench/engine.py) so 8 sessions sending audio
    # and a frame every tick step in ~35 ms p50 here. Small parameter bytes matter more than FLOPs
    # at this batch: a tick reads every expert, and this CPU streams weights at ~8 GB/s.
    "tiny": InteractionConfig(
        name="tiny", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
        n_experts=8, top_k=2, d_ff=192, window=512, n_sink=32, dmel_dim=128, stem_dims=(24, 64),
        flow_dim=128, flow_layers=2, flow_steps=4,
    ),
    # Bigger, still CPU-runnable for a few sessions.
    "small": InteractionConfig(
        name="small", d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
        n_experts=8, top_k=2, d_ff=1024, d_ff_shared=512, window=2048, n_sink=64,
        dmel_dim=256, stem_dims=(64, 192), flow_dim=512, flow_layers=3,
    ),
    # ~12B active parameters (top-4 of 8 experts), ~22B in all, so that bf16 weights (~44 GB)
    # plus 64 sessions' KV caches (~22 GB at a 2,048-token window) fit one 80 GB H100.
    "gpu12b": InteractionConfig(
        name="gpu12b", d_model=4096, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128,
        n_experts=8, top_k=4, d_ff=5120, rope_theta=1_000_000.0, window=2048, n_sink=64,
        dmel_dim=512, stem_dims=(128, 384), flow_dim=1024, flow_layers=4, flow_steps=4,
    ),
}
