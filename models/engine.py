"""`StreamingEngine`: many sessions, one batched forward pass per tick, no Ray.

Built in layers: the sessions and the pre-sized rows holding their state, joining and leaving,
export and import (`EngineRows`, models/engine_rows.py); one tick, `step(chunks)` (`EngineStep`,
models/engine_step.py); and here the model, the input builder and the vocoder it is made of, and
`replay`.

So a session can leave one engine and come back in another exactly: `export_session` /
`import_session` move its state, and `replay` brings it back from an exported state (a snapshot)
plus the input chunks stepped since, replayed alone on a one-row engine sharing the weights (it
may run beside a step), whose result `import_session` takes in. Since
a chunk carries everything that entered at its tick (audio, frame, text, background updates,
forced control), the rebuilt session is the one that was left, to the float tolerance batching
already has: text and controls exactly; rarely a dMel code on a quantisation step's edge, and the
vocoder's peak-locked phase, can turn last-bit noise into a different waveform of the same level.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from models.config import InteractionConfig
from models.engine_step import VOCODER, EngineStep
from models.inputs import InputBuilder
from models.model import InteractionModel, build_model
from models.session_state import Row, Rows, Session
from models.vocoder import Vocoder
from protocols.chunks import InputChunk, OutputChunk, ProtocolError, check_session_id


class StreamingEngine(EngineStep):
    """Implements `protocols.ports.Engine`."""

    def __init__(
        self,
        model_or_config: InteractionModel | InteractionConfig | str,
        max_sessions: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        temperature: float = 0.0,
        init_seed: int = 0,
        mute_when_silent: bool = True,
        onset_margin: float = 0.0,
    ):
        """`model_or_config`: a model, a config or a preset name. A config is built with weights
        drawn from `init_seed`, so every engine built from the same preset holds the same model and
        sessions can move between them (export_session / import_session). With
        `mute_when_silent`, a micro-turn whose control is "silent" outputs silence (and the model
        hears silence back), whatever the flow head drew. `onset_margin`: a quiet session (last
        control "silent" or "delegate") starts to speak only where "speak" or "yield" beats the
        other controls by this many logits; the operating point of its turn-taking, as an
        endpointer's silence threshold is (a checkpoint's calibrated value: `load_decision`)."""
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(model_or_config, str):
            model_or_config = InteractionConfig.preset(model_or_config)
        if isinstance(model_or_config, InteractionConfig):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = build_model(model_or_config, device, dtype)
        else:
            model = model_or_config.to(device=device, dtype=dtype)
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg = model.cfg
        self.device, self.dtype = device, dtype
        self.max_sessions = max_sessions
        self.temperature = float(temperature)
        self.mute_when_silent = mute_when_silent
        self.onset_margin = float(onset_margin)
        self.inputs = InputBuilder(cfg, device)
        self.tokenizer = self.inputs.tokenizer
        self.vocoder = Vocoder(self.inputs.features).to(device)
        with torch.inference_mode():
            self.rows = Rows(self._row_spec(), max_sessions, device)
        self._sessions: dict[str, Session] = {}
        self._by_row: list[str] = []
        self._scratch_engine: StreamingEngine | None = None
        self._scratch_lock = threading.Lock()

    @property
    def tick_ms(self) -> int:
        """The tick length the model was trained at: every chunk holds this much audio."""
        return self.cfg.tick_ms

    def _row_spec(self) -> dict[str, Row]:
        """Every per-session tensor: the KV cache, the absolute position held in each cache slot
        (-1: empty), the next position, the input builder's state, the vocoder's state."""
        cfg = self.cfg
        kv = Row((cfg.n_layers, cfg.n_kv_heads, cfg.cache_len, cfg.head_dim), self.dtype, 0.0, axis=1)
        voc = self.vocoder.init_state(1, self.device)
        return {
            "k": kv, "v": kv,
            "slot_pos": Row((cfg.cache_len,), torch.long, -1),
            "pos": Row((), torch.long, 0),
            **self.inputs.rows(),
            **{VOCODER + name: Row(tuple(t.shape[1:]), t.dtype, t[0]) for name, t in voc.items()},
        }

    def replay(self, session_id: str, state: dict | None = None, seed: int | None = None,
               chunks: Sequence[InputChunk] = ()) -> tuple[dict, list[OutputChunk]]:
        """Step one session's logged `chunks` (seq after the state's, in order) again, alone, from
        `state` (an `export_session`, e.g. a snapshot) or a fresh session with `seed`.
        -> its state after the last chunk (for `import_session`) and the outputs of the replay
        (those of a refused chunk included: refusal is part of the record).

        It runs on a one-row engine sharing this one's weights and touches none of this engine's
        sessions, so it may run beside `step` (in another thread); replays take turns."""
        check_session_id(session_id)
        last = state["session"]["last_seq"] if state is not None else None
        for c in chunks:
            if not isinstance(c, InputChunk) or c.session_id != session_id:
                raise ProtocolError(f"rebuilding {session_id!r} takes only its own input chunks", "invalid_state", "chunks")
            if last is not None and c.seq <= last:
                raise ProtocolError(f"chunk seq {c.seq} is not after {last}: chunks must follow the state in order", "invalid_state", "chunks")
            last = c.seq
        with self._scratch_lock:
            scratch = self._scratch()
            if state is not None:
                scratch.import_session(session_id, state)
            else:
                scratch.add_session(session_id, seed)
            try:
                outs = []
                for c in chunks:
                    outs += scratch.step([c])[0]
                return scratch.export_session(session_id), outs
            finally:
                scratch.remove_session(session_id)

    def _scratch(self) -> "StreamingEngine":
        """A one-row engine on the same weights that steps a session alone (kept for reuse)."""
        if self._scratch_engine is None:
            self._scratch_engine = StreamingEngine(self.model, max_sessions=1, device=self.device, dtype=self.dtype)
        scratch = self._scratch_engine
        scratch.temperature, scratch.mute_when_silent = self.temperature, self.mute_when_silent
        scratch.onset_margin = self.onset_margin
        return scratch

    def state_bytes(self) -> int:
        """Bytes held in the engine's pre-sized tensors (constant for its lifetime)."""
        return self.rows.nbytes()
