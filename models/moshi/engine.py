"""`MoshiEngine`: Moshi-family checkpoints (Moshi, PersonaPlex, Hibiki) behind the `Engine` port.

It runs the `moshi` package's own modules (`LMGen` over `LMModel`, `MimiModel`); their streaming
state is batched over a fixed set of `max_sessions` rows. A session takes a free row (reset with
the package's per-row reset mask) and leaves it without touching the others; rows without a
session are stepped with the package's execution mask off, so their state does not move. The
cost of a tick is therefore that of `max_sessions` rows, however many are live.

`step(chunks)` reads top to bottom: validate (as `StreamingEngine`: a bad or absent chunk is
reported under its session and stepped as silence), then for the whole batch: 16 kHz -> 24 kHz
(`Resampler`, per-row state), Mimi encode, one `LMGen.step` per 80 ms frame, Mimi decode
of the frames every row has generated (a session's first frame has no audio yet: Moshi's
acoustic delay), 24 kHz -> 16 kHz, and the outputs: the text stream as the chunk's text, the
audio, and a control, "speak" where the tick has text or audible audio, else "silent" (a chunk's
`forced` control replaces it; a forced "silent" also mutes the audio).

Tokens are sampled per session (sampling.py: `SeededLMGen`): a row's draw for a frame depends
only on the session's seed and the frame's index in the session, so a session's outputs are the
same whoever shares the batch, and replaying its logged chunks from its seed gives them again.
The defaults are Kyutai's (text: temperature 0.7, top 25; audio: 0.8, top 250); temperature 0
is greedy.

A tick is `frames_per_tick` Mimi frames of 80 ms. Past the LM's trained `context` a session goes
on: the package's `RingKVCache` holds the last `context` positions and attention sees no further
back, so a tick costs the same at any age and the state is bounded.

Background updates (`push_update`, or a chunk's `updates`) are tokenized and enter the model's
own text stream, one token a frame, in place of the token it would have chosen: the model speaks
them (Moshi's text stream leads its speech). Typed user text (`chunk.text`) and video frames have
no input in these models and are ignored. `export_session` / `import_session` / `replay` /
`rebuild` move a session exactly, as in `StreamingEngine`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import threading
import time
import zlib
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from models.moshi.checkpoint import MoshiModels, load
from models.moshi.resample import Resampler
from models.moshi.rows import export_row, load_row
from models.moshi.session import MoshiSession
from models.step_checks import session_of, validate
from protocols.chunks import SAMPLE_RATE, InputChunk, OutputChunk, ProtocolError, check_audio, check_session_id, check_text

STATE_VERSION = 1
FRAME_MS = 80  # one Mimi frame (12.5 Hz)
DEFAULT_FRAMES_PER_TICK = 1  # chosen by bench.engine --moshi (see the README's figures)
UNGENERATED = -2  # LMModel.ungenerated_token_id


class MoshiEngine:
    """Implements `protocols.ports.Engine` for a Moshi-family checkpoint directory."""

    def __init__(self, checkpoint: str | Path | MoshiModels, max_sessions: int = 8, frames_per_tick: int = DEFAULT_FRAMES_PER_TICK,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None, activity_rms: float = 1e-3,
                 max_queued_tokens: int = 4096, temperature: float = 0.8, top_k: int = 250,
                 temperature_text: float = 0.7, top_k_text: int = 25, _spare: bool = True):
        """`checkpoint`: a directory (models/moshi/checkpoint.py) or loaded models. `activity_rms`:
        the output level (full scale 1) above which a tick without text still counts as speech.
        `temperature` / `top_k` sample the audio codebooks, `*_text` the text stream (top_k 0: the
        whole vocabulary; temperature 0: greedy)."""
        models = checkpoint if isinstance(checkpoint, MoshiModels) else load(checkpoint, device, dtype)
        if not 1 <= frames_per_tick <= 25 or max_sessions < 1:
            raise ValueError(f"frames_per_tick must be 1..25 and max_sessions >= 1, got {frames_per_tick}, {max_sessions}")
        from models.moshi.sampling import SeededLMGen

        self.models, self.tokenizer = models, models.tokenizer
        self.max_sessions, self.frames_per_tick = max_sessions, frames_per_tick
        self.activity_rms, self.max_queued_tokens = activity_rms, max_queued_tokens
        self.device = next(models.lm.parameters()).device
        # Made before streaming starts: a copy sharing the weights, for the one-row replay engine.
        self._spare = _share(models) if _spare else None
        self._scratch_engine: MoshiEngine | None = None
        self._scratch_lock = threading.Lock()
        self.sampling = {"temperature": temperature, "top_k": top_k, "temperature_text": temperature_text, "top_k_text": top_k_text}
        self.lm_gen = SeededLMGen(models.lm, **self.sampling, on_text_hook=self._force_text)
        self.mimi = models.mimi
        self.frame_24k = self.mimi.frame_size  # 1920 samples at 24 kHz
        self.up, self.down = Resampler(3, 2, device=self.device), Resampler(2, 3, device=self.device)
        self.pads = {models.lm.existing_text_padding_id, models.lm.existing_text_end_padding_id}
        with torch.no_grad():
            self.mimi.streaming_forever(max_sessions)
            self.lm_gen.streaming_forever(max_sessions)
            self.res_in = self.up.init_state(max_sessions, self.device)  # (B, taps - 1)
            self.res_out = self.down.init_state(max_sessions, self.device)
        self._sessions: dict[str, MoshiSession] = {}
        self._free = list(range(max_sessions))
        self._forced_now: torch.Tensor | None = None
        self.last_tokens: dict[str, np.ndarray] = {}  # per session, the last tick's tokens (1 + dep_q, F)

    def _compile(self):
        """The package torch.compiles its RoPE, gating and norms on first use; on CPU that costs
        ~15 s at start and gains nothing at these sizes, so it runs them eagerly there."""
        from moshi.utils.compile import no_compile

        return contextlib.nullcontext() if self.device.type == "cuda" else no_compile()

    @property
    def tick_ms(self) -> int:
        return FRAME_MS * self.frames_per_tick

    @property
    def samples_per_tick(self) -> int:
        return SAMPLE_RATE * self.tick_ms // 1000

    @property
    def sessions(self) -> list[str]:
        return list(self._sessions)

    # ---- sessions ----
    def add_session(self, session_id: str, seed: int | None = None) -> None:
        """Take the lowest free row and reset it. `seed` (default: from the id) keys the session's
        sampling and is kept with its state."""
        self._can_add(session_id)
        row = self._free.pop(0)
        seed = zlib.crc32(session_id.encode()) if seed is None else int(seed)
        self._sessions[session_id] = MoshiSession(session_id, seed, row)
        mask = torch.zeros(self.max_sessions, dtype=torch.bool, device=self.device)
        mask[row] = True
        with torch.no_grad():
            self.lm_gen.reset_streaming(mask)
            self.mimi.reset_streaming(mask)
            self.res_in[row] = 0.0
            self.res_out[row] = 0.0

    def remove_session(self, session_id: str) -> None:
        sess = self._get(session_id)
        del self._sessions[session_id]
        self._free = sorted(self._free + [sess.row])

    def push_update(self, session_id: str, text: str) -> None:
        """Queue a background update's tokens for the model's text stream (see the docstring)."""
        sess = self._get(session_id)
        try:
            self._queue(sess, [text])
        except ProtocolError as e:
            raise ProtocolError(f"session {session_id!r}: {e}", e.code, e.param) from None

    def _queue(self, sess: MoshiSession, texts: list[str]) -> None:
        tokens = [t for text in texts for t in self.tokenizer.encode(check_text(text, "updates"))]
        if len(sess.forced_text) + len(tokens) > self.max_queued_tokens:
            raise ProtocolError(f"more than {self.max_queued_tokens} update tokens queued", "invalid_text", "updates")
        sess.forced_text.extend(tokens)

    def _get(self, session_id: Any) -> MoshiSession:
        return session_of(self._sessions, session_id)

    def _can_add(self, session_id: str) -> None:
        check_session_id(session_id)
        if session_id in self._sessions:
            raise ProtocolError(f"session {session_id!r} already exists", "duplicate_session", "session_id")
        if not self._free:
            raise ProtocolError(f"engine is full ({self.max_sessions} sessions); cannot add {session_id!r}", "capacity", "session_id")

    # ---- one tick ----
    def step(self, chunks: list[InputChunk]) -> tuple[list[OutputChunk], dict[str, ProtocolError]]:
        """One tick for every session; contract as `StreamingEngine.step`."""
        t0 = time.perf_counter()
        accepted, errors = self._validate(chunks)
        if not self._sessions:
            return [], errors
        live = list(self._sessions.values())
        batch = [accepted[s.sid] for s in live]
        with torch.no_grad(), self._compile():
            toks, pcm = self._forward(live, batch)
        outs = self._outputs(live, batch, toks, pcm, t0)
        toks = toks.cpu().numpy()
        self.last_tokens = {s.sid: toks[s.row] for s in live}
        return [outs[sid] for sid in accepted], errors

    def _forward(self, live: list[MoshiSession], batch: list[InputChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens (B, 1 + dep_q, F) (UNGENERATED where none yet) and 16 kHz audio (B, samples)."""
        B, F, dev = self.max_sessions, self.frames_per_tick, self.device
        rows = torch.tensor([s.row for s in live], device=dev)
        live_mask = torch.zeros(B, dtype=torch.bool, device=dev)
        live_mask[rows] = True
        pcm = torch.zeros(B, self.samples_per_tick, device=dev)  # (B, 1280 F) at 16 kHz
        pcm[rows] = torch.from_numpy(np.stack([c.audio for c in batch])).to(dev, torch.float32) / 32768.0
        x24, self.res_in = self.up(pcm, self.res_in)  # (B, 1920 F)
        self.mimi.set_exec_mask(live_mask)
        codes = self.mimi.encode(x24[:, None])  # (B, K, F)
        self.lm_gen.set_exec_mask(live_mask)
        toks = []
        for f in range(F):
            self._forced_now = self._take_forced(live)
            self.lm_gen.draw([(s.row, s.seed, s.frames + f) for s in live])
            step = self.lm_gen.step(codes[:, :, f:f + 1])  # (B, 1 + dep_q, 1)
            assert step is not None  # out-of-sync LMGen answers every frame (rows in their delay are masked)
            toks.append(step[:, :, 0])
        self._forced_now = None
        toks = torch.stack(toks, -1)  # (B, 1 + dep_q, F)
        made = (toks[:, 1:] != UNGENERATED).all(1) & live_mask[:, None]  # (B, F)
        y24 = self._decode(toks[:, 1:].clamp_min(0), made, live_mask)  # (B, 1920 F)
        y16, self.res_out = self.down(y24, self.res_out)  # (B, 1280 F)
        return toks, y16

    def _decode(self, codes: torch.Tensor, made: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Mimi decode of the generated frames, one call for the tick where every live row has all
        of its frames, else frame by frame with each frame's rows; silence where none yet."""
        if bool((made | ~live[:, None]).all()):
            self.mimi.set_exec_mask(live)
            y = self.mimi.decode(codes)[:, 0].float()  # (B, 1920 F)
        else:
            ys = []
            for f in range(codes.shape[-1]):
                self.mimi.set_exec_mask(made[:, f])
                ys.append(self.mimi.decode(codes[:, :, f:f + 1])[:, 0].float())  # (B, 1920)
            y = torch.cat(ys, 1)
        return y * made.repeat_interleave(self.frame_24k, 1)

    def _take_forced(self, live: list[MoshiSession]) -> torch.Tensor | None:
        """This frame's queued update token per row (-1: none), or None when no row has one."""
        if not any(s.forced_text for s in live):
            return None
        forced = torch.full((self.max_sessions,), -1, dtype=torch.long)
        for s in live:
            if s.forced_text:
                forced[s.row] = s.forced_text.popleft()
        return forced.to(self.device)

    def _force_text(self, text_token: torch.Tensor) -> None:
        """LMGen's text hook: the token it chose (B,), replaced in place where an update is due
        (LMGen feeds this tensor to the depformer and its cache after the hook)."""
        if self._forced_now is not None:
            text_token.copy_(torch.where(self._forced_now >= 0, self._forced_now, text_token))

    def _outputs(self, live, batch, toks: torch.Tensor, pcm: torch.Tensor, t0: float) -> dict[str, OutputChunk]:
        text = toks[:, 0].tolist()  # (B, F)
        audio = (pcm.clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).cpu().numpy()
        rms = pcm.float().pow(2).mean(1).sqrt().tolist()
        step_ms = (time.perf_counter() - t0) * 1000.0
        outs = {}
        for s, c in zip(live, batch):
            said = "".join(self.tokenizer.id_to_piece(t) for t in text[s.row] if t >= 0 and t not in self.pads).replace("\u2581", " ")
            control = c.forced or ("speak" if said or rms[s.row] > self.activity_rms else "silent")
            a = audio[s.row] if control != "silent" or not c.forced else np.zeros_like(audio[s.row])
            s.last_seq, s.frames = c.seq, s.frames + self.frames_per_tick
            outs[s.sid] = OutputChunk(s.sid, c.seq, c.t_start, a, said, [control], step_ms=step_ms)
        return outs

    def _validate(self, chunks: list[Any]) -> tuple[dict[str, InputChunk], dict[str, ProtocolError]]:
        return validate(chunks, self._check, list(self._sessions), lambda sid, like: self._missing(self._sessions[sid], like))

    def _check(self, chunk: InputChunk) -> tuple[str, InputChunk]:
        sess = self._get(chunk.session_id)
        sid = sess.sid
        try:
            check_audio(chunk.audio, samples=self.samples_per_tick)
            chunk = dataclasses.replace(chunk)
            if sess.last_seq is not None and chunk.seq <= sess.last_seq:
                raise ProtocolError(f"seq {chunk.seq} out of order, expected {sess.last_seq + 1} or later", "out_of_order", "seq")
            self._queue(sess, list(chunk.updates))
        except ProtocolError as e:
            raise ProtocolError(f"session {sid!r}: {e}", e.code, e.param) from None
        return sid, chunk

    def _missing(self, sess: MoshiSession, like: Any = None) -> InputChunk:
        seq = getattr(like, "seq", -1)
        seq = int(seq) if isinstance(seq, (int, np.integer)) and not isinstance(seq, bool) else -1
        if seq < 0 or (sess.last_seq is not None and seq <= sess.last_seq):
            seq = sess.last_seq + 1 if sess.last_seq is not None else 0
        t_start = getattr(like, "t_start", 0.0)
        t_start = float(t_start) if isinstance(t_start, (int, float)) else 0.0
        return InputChunk.silent(sess.sid, seq, t_start, self.samples_per_tick)

    # ---- state transfer ----
    def identity(self) -> dict:
        """What a session's state depends on: the checkpoint's configs and how tokens are drawn
        (a state made under other sampling would not replay to the same tokens)."""
        return {**self.models.checkpoint.identity(), "sampling": self.sampling}

    def _stateful(self) -> dict:
        """The streaming modules whose state is per row: LMGen (its token delay cache), the LM
        (detached from LMGen's streaming: its KV caches), Mimi."""
        return {"gen": self.lm_gen, "lm": self.lm_gen.lm_model, "mimi": self.mimi}

    def export_session(self, session_id: str) -> dict:
        """The session's rows of every streaming state, as numpy, plus its host-side values."""
        sess = self._get(session_id)
        with torch.no_grad():
            rows = {f"{part}:{k}": v for part, module in self._stateful().items() for k, v in export_row(module, sess.row).items()}
            rows.update({
                "resample:in": self.res_in[sess.row].cpu().numpy().copy(),
                "resample:out": self.res_out[sess.row].cpu().numpy().copy()})
        return {"version": STATE_VERSION, "identity": self.identity(), "session": sess.export(), "rows": rows}

    def import_session(self, session_id: str, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ProtocolError(f"session state version {getattr(state, 'get', dict().get)('version')!r} is not {STATE_VERSION}", "invalid_state", "state")
        if state.get("identity") != self.identity():
            raise ProtocolError("session state was made by a different model", "invalid_state", "state")
        self.add_session(session_id, seed=state["session"]["seed"])
        row = self._sessions[session_id].row
        rows = state["rows"]
        try:
            with torch.no_grad():
                for part, module in self._stateful().items():
                    load_row(module, row, {k[len(part) + 1:]: v for k, v in rows.items() if k.startswith(part + ":")})
                self.res_in[row] = torch.as_tensor(rows["resample:in"], device=self.device)
                self.res_out[row] = torch.as_tensor(rows["resample:out"], device=self.device)
        except (ValueError, KeyError, RuntimeError) as e:
            self.remove_session(session_id)
            raise ProtocolError(f"session state does not fit: {e}", "invalid_state", "state") from None
        self._sessions[session_id] = MoshiSession.restore(session_id, row, state["session"])

    def replay(self, session_id: str, state: dict | None = None, seed: int | None = None,
               chunks: Sequence[InputChunk] = ()) -> tuple[dict, list[OutputChunk]]:
        """Step one session's `chunks` alone on a one-row engine sharing these weights, from
        `state` or fresh: -> its state after them and their outputs."""
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
                outs = list(itertools.chain.from_iterable(scratch.step([c])[0] for c in chunks))
                return scratch.export_session(session_id), outs
            finally:
                scratch.remove_session(session_id)

    def rebuild(self, session_id: str, state: dict | None = None, seed: int | None = None, chunks: Sequence[InputChunk] = ()) -> list[OutputChunk]:
        self._can_add(session_id)
        rebuilt, outs = self.replay(session_id, state, seed, chunks)
        self.import_session(session_id, rebuilt)
        return outs

    def _scratch(self) -> "MoshiEngine":
        if self._scratch_engine is None:
            if self._spare is None:
                raise RuntimeError("a replay engine has no replay engine of its own")
            self._scratch_engine = MoshiEngine(self._spare, 1, self.frames_per_tick, activity_rms=self.activity_rms,
                                               max_queued_tokens=self.max_queued_tokens, **self.sampling, _spare=False)
        return self._scratch_engine

    def state_bytes(self) -> int:
        """Bytes held in the per-row streaming state (constant for the engine's lifetime)."""
        from models.moshi.rows import row_tensors

        tensors = [t for m in self._stateful().values() for t in row_tensors(m).values()]
        return sum(t.numel() * t.element_size() for t, _ in tensors) + (self.res_in.numel() + self.res_out.numel()) * 4


def _share(models: MoshiModels) -> MoshiModels:
    """A second set of the modules (so a second streaming state) over the same weight tensors."""
    memo = {id(t): t for m in (models.lm, models.mimi) for t in itertools.chain(m.parameters(), m.buffers())}
    return MoshiModels(copy.deepcopy(models.lm, memo), copy.deepcopy(models.mimi, memo), models.tokenizer, models.checkpoint)
