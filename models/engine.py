"""`StreamingEngine`: many sessions, one batched forward pass per 200 ms tick, no Ray.

Every per-session tensor lives in a static, pre-sized batch slot (row); live sessions occupy
rows [0, n), so a tick reads contiguous views and never copies a cache. Each row's KV cache holds
`n_sink` sink positions (kept forever) and a ring of the last `window + one tick` positions, with
keys stored already rotated at their absolute positions, so a tick's cost and the engine's memory
are bounded no matter how long a session runs. A session's outputs depend only on its own inputs
and seed, never on who else is in the batch.

Validation runs before anything is computed: `step` raises `ProtocolError` naming the session;
`step_checked` steps the good chunks, steps bad sessions as missing (clocks stay aligned) and
returns the errors.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.config import CONTROLS, InteractionConfig
from models.features import DMel, FeatureConfig, patchify
from models.model import InteractionModel, TickInputs, _mix, build_model, flow_noise
from models.tokenizer import IncrementalDecoder
from models.transformer import additive_mask, visible
from models.vocoder import Vocoder
from protocols.chunks import (
    InputChunk,
    OutputChunk,
    ProtocolError,
    check_audio,
    check_frame,
    check_session_id,
    check_text,
)

STATE_VERSION = 1
RESPONSE_TICKS = 50  # a requested response speaks for at most 10 s unless the model yields first


@dataclass
class _Session:
    sid: str
    seed: int
    row: int
    last_seq: int | None = None
    text_queue: deque = field(default_factory=deque)
    bg_queue: deque = field(default_factory=deque)
    decoder: IncrementalDecoder = field(default_factory=IncrementalDecoder)
    trace: list = field(default_factory=list)
    respond_ticks: int = 0  # ticks left of a response the client asked for (response.create)


@dataclass
class _Planned:
    """A validated chunk, with its text already tokenised."""

    chunk: InputChunk
    session: _Session
    text_ids: list[int]


class StreamingEngine:
    def __init__(
        self,
        model_or_config: InteractionModel | InteractionConfig | str,
        max_sessions: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        temperature: float = 0.0,
        trace: bool = False,
        init_seed: int = 0,
        mute_when_silent: bool = True,
    ):
        """`model_or_config`: a model, a config or a preset name. A config is built with weights
        drawn from `init_seed`, so every engine built from the same preset holds the same model and
        sessions can move between them (export_session / import_session). With
        `mute_when_silent`, a micro-turn whose control is "silent" outputs silence (and the model
        hears silence back), whatever the flow head drew. `trace` keeps every tick's model inputs
        and predictions per session (tests)."""
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
        self.trace = trace
        self.tokenizer = model.tokenizer

        self.features = FeatureConfig()
        if (self.features.n_mels, self.features.levels, self.features.frames_per_chunk) != (cfg.n_mels, cfg.mel_levels, cfg.frames_per_tick):
            raise ValueError("model config and FeatureConfig disagree on n_mels / levels / frames per tick")
        self.dmel = DMel(self.features).to(device)
        self.vocoder = Vocoder(self.features).to(device)

        ms, s = max_sessions, cfg.cache_len
        with torch.inference_mode():
            kv_shape = (cfg.n_layers, ms, cfg.n_kv_heads, s, cfg.head_dim)
            self.k_cache = torch.zeros(kv_shape, dtype=dtype, device=device)
            self.v_cache = torch.zeros(kv_shape, dtype=dtype, device=device)
            self.slot_pos = torch.full((ms, s), -1, dtype=torch.long, device=device)  # absolute position per slot
            self.pos = torch.zeros(ms, dtype=torch.long, device=device)  # next absolute position
            self.tick = torch.zeros(ms, dtype=torch.long, device=device)  # the session's own clock
            self.prev_ctrl = torch.zeros(ms, dtype=torch.long, device=device)
            self.prev_text = torch.zeros(ms, cfg.text_out, dtype=torch.long, device=device)
            self.prev_codes = torch.zeros(ms, cfg.frames_per_tick, cfg.n_mels, dtype=torch.long, device=device)
            self.dmel_state = self.dmel.init_state(ms, device)
            self.voc_state = self.vocoder.init_state(ms, device)
            silent_audio = torch.zeros(1, self.features.hop * cfg.frames_per_tick, device=device)
            self.silence_codes = self.dmel.quantize(self.dmel(silent_audio, self.dmel.init_state(1, device))[0])[0]  # (F, M)
        self._sessions: dict[str, _Session] = {}
        self._by_row: list[str] = []

    # ---- sessions ----
    @property
    def sessions(self) -> list[str]:
        return list(self._by_row)

    def add_session(self, session_id: str, seed: int | None = None) -> None:
        check_session_id(session_id)
        if session_id in self._sessions:
            raise ProtocolError(f"session {session_id!r} already exists", "duplicate_session", "session_id")
        if len(self._by_row) >= self.max_sessions:
            raise ProtocolError(f"engine is full ({self.max_sessions} sessions); cannot add {session_id!r}", "capacity", "session_id")
        row = len(self._by_row)
        seed = zlib.crc32(session_id.encode()) if seed is None else int(seed)
        self._sessions[session_id] = _Session(session_id, seed, row)
        self._by_row.append(session_id)
        with torch.inference_mode():
            self._reset_row(row)

    def remove_session(self, session_id: str) -> None:
        sess = self._get(session_id)
        last = len(self._by_row) - 1
        with torch.inference_mode():
            if sess.row != last:  # keep live rows contiguous: move the last row into the hole
                self._copy_row(last, sess.row)
                moved = self._sessions[self._by_row[last]]
                moved.row = sess.row
                self._by_row[sess.row] = moved.sid
            self.slot_pos[last] = -1
        self._by_row.pop()
        del self._sessions[session_id]

    def push_update(self, session_id: str, text: str) -> None:
        """Queue a background update; it enters as its own stream on the following ticks."""
        sess = self._get(session_id)
        check_text(text, "update")
        ids = [self.tokenizer.bg_id, *self.tokenizer.encode(text), self.tokenizer.eot_id]
        if len(sess.bg_queue) + len(ids) > self.cfg.max_queued_tokens:
            raise ProtocolError(f"session {session_id!r}: background queue is full", "queue_full", "update")
        sess.bg_queue.extend(ids)

    def _get(self, session_id: Any) -> _Session:
        sess = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if sess is None:
            raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
        return sess

    def _row_tensors(self) -> list[torch.Tensor]:
        """Every per-row state tensor, with the row axis first."""
        return [self.slot_pos, self.pos, self.tick, self.prev_ctrl, self.prev_text, self.prev_codes, self.dmel_state, *self.voc_state.values()]

    def _copy_row(self, src: int, dst: int) -> None:
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]
        for t in self._row_tensors():
            t[dst] = t[src]

    def _reset_row(self, row: int) -> None:
        self.slot_pos[row] = -1
        self.pos[row] = 0
        self.tick[row] = 0
        self.prev_ctrl[row] = CONTROLS.index("silent")
        self.prev_text[row] = self.tokenizer.pad_id
        self.prev_codes[row] = self.silence_codes
        self.dmel_state[row] = 0
        fresh = self.vocoder.init_state(1, self.device)
        for k, t in self.voc_state.items():
            t[row] = fresh[k][0]

    # ---- validation ----
    def _check_chunk(self, chunk: Any, seen: set[str]) -> _Planned:
        if not isinstance(chunk, InputChunk):
            raise ProtocolError(f"expected an InputChunk, got {type(chunk).__name__}", "invalid_value", "chunk")
        sid = chunk.session_id
        sess = self._get(sid)
        if sid in seen:
            raise ProtocolError(f"session {sid!r} has more than one chunk in this step", "duplicate_session", "session_id")
        try:
            check_audio(chunk.audio)
            frame = check_frame(chunk.frame)
            check_text(chunk.text)
        except ProtocolError as e:
            raise ProtocolError(f"session {sid!r}: {e}", e.code, e.param) from None
        fs = self.cfg.frame_size
        if frame is not None and frame.shape != (fs, fs, 3):
            raise ProtocolError(f"session {sid!r}: frame must be {fs}x{fs}x3 for this model, got {frame.shape[0]}x{frame.shape[1]}", "invalid_frame", "frame")
        if sess.last_seq is not None and chunk.seq != sess.last_seq + 1:
            raise ProtocolError(f"session {sid!r}: seq {chunk.seq} out of order, expected {sess.last_seq + 1}", "out_of_order", "seq")
        ids = [self.tokenizer.txt_id, *self.tokenizer.encode(chunk.text), self.tokenizer.eot_id] if chunk.text else []
        if len(sess.text_queue) + len(ids) > self.cfg.max_queued_tokens:
            raise ProtocolError(f"session {sid!r}: typed-text queue is full", "queue_full", "text")
        return _Planned(chunk, sess, ids)

    def _missing(self, sess: _Session, like: Any = None) -> _Planned:
        seq = sess.last_seq + 1 if sess.last_seq is not None else max(0, _int_or(getattr(like, "seq", 0), 0))
        t_start = float(_int_or(getattr(like, "t_start", 0.0), 0.0))
        return _Planned(InputChunk.silent(sess.sid, seq, t_start), sess, [])

    # ---- stepping ----
    def step(self, chunks: list[InputChunk]) -> list[OutputChunk]:
        """One batched micro-turn for every session: one chunk per present session, any order.
        Returns one OutputChunk per chunk, in the same order. Raises ProtocolError (and changes
        nothing) if any chunk is bad."""
        t0 = time.perf_counter()
        seen: set[str] = set()
        planned = []
        for c in chunks:
            p = self._check_chunk(c, seen)
            seen.add(p.session.sid)
            planned.append(p)
        absent = [s for s in self._by_row if s not in seen]
        if absent:
            raise ProtocolError(f"no chunk for session(s) {absent}; pass InputChunk.silent(...) for missing input", "missing_session", "session_id")
        if not planned:
            return []
        outs = self._run(planned, t0)
        return [outs[p.session.row] for p in planned]

    def step_checked(self, chunks: list[Any]) -> tuple[list[OutputChunk], dict[str, ProtocolError]]:
        """Like `step`, but a bad chunk never stops the others: it is dropped, its session is
        stepped as missing, and the error is reported under its session id. Returns outputs for
        every stepped session (good chunks first, in their order, then the sessions stepped as
        missing) and the errors."""
        t0 = time.perf_counter()
        seen: set[str] = set()
        good, errors, bad_like = [], {}, {}
        for c in chunks:
            try:
                p = self._check_chunk(c, seen)
            except ProtocolError as e:
                sid = getattr(c, "session_id", None)
                key = sid if isinstance(sid, str) else repr(c)[:64]
                errors.setdefault(key, e)
                if key in self._sessions and key not in seen:
                    bad_like[key] = c
                continue
            seen.add(p.session.sid)
            good.append(p)
        fill = []
        for sid in self._by_row:
            if sid in seen:
                continue
            if sid not in errors:
                errors[sid] = ProtocolError(f"no chunk for session {sid!r}; stepped as missing", "missing_session", "session_id")
            fill.append(self._missing(self._sessions[sid], bad_like.get(sid)))
        if not self._by_row:
            return [], errors
        outs = self._run(good + fill, t0)
        return [outs[p.session.row] for p in good + fill], errors

    @torch.inference_mode()
    def _run(self, planned: list[_Planned], t0: float) -> list[OutputChunk]:
        cfg, model, tk, dev = self.cfg, self.model, self.tokenizer, self.device
        n = len(planned)
        by_row: list[_Planned] = [None] * n  # type: ignore[list-item]
        for p in planned:
            by_row[p.session.row] = p

        # Features: dMel codes of the input audio, patches of the frames that came.
        audio = torch.from_numpy(np.stack([p.chunk.audio for p in by_row])).to(dev)
        logmel, dmel_state = self.dmel(audio, self.dmel_state[:n])
        codes = self.dmel.quantize(logmel)  # (n, F, M)
        video_rows = [i for i, p in enumerate(by_row) if p.chunk.frame is not None]
        patches = None
        if video_rows:
            frames = torch.from_numpy(np.stack([by_row[i].chunk.frame for i in video_rows])).to(dev)
            patches = patchify(frames, cfg.patch)  # (Bv, P, 3, p, p)

        text_ids, bg_ids = [], []
        for p in by_row:
            s = p.session
            s.text_queue.extend(p.text_ids)
            text_ids.append(_take(s.text_queue, cfg.text_per_tick))
            bg_ids.append(_take(s.bg_queue, cfg.bg_per_tick))

        inp = TickInputs(codes, self.prev_codes[:n], self.prev_ctrl[:n], self.prev_text[:n], self.tick[:n],
                         patches, video_rows, text_ids, bg_ids)
        x, lens = model.embed(inp)  # (n, T, d), (n,)

        # Cache slots for this tick's tokens; pad tokens are neither written nor visible.
        t = x.shape[1]
        ar = torch.arange(t, device=dev)
        positions = self.pos[:n, None] + ar  # (n, T)
        valid = ar[None] < lens[:, None]
        ring_slot = cfg.n_sink + (positions - cfg.n_sink) % cfg.ring
        slots = torch.where(positions < cfg.n_sink, positions, ring_slot)
        rows_v = torch.arange(n, device=dev)[:, None].expand(n, t)[valid]
        slots_v = slots[valid]
        self.slot_pos[rows_v, slots_v] = positions[valid]
        kv = cfg.n_kv_heads
        write_idx = ((rows_v[:, None] * kv + torch.arange(kv, device=dev)) * cfg.cache_len + slots_v[:, None]).reshape(-1)
        mask = visible(positions[:, :, None], self.slot_pos[:n, None, :], cfg.n_sink, cfg.window)  # (n, T, S)
        mask = additive_mask(mask.repeat(1, cfg.n_heads // kv, 1)[:, None], self.dtype)  # (n, 1, G*T, S)

        caches = [(self.k_cache[i], self.v_cache[i]) for i in range(cfg.n_layers)]
        h = model.transformer.forward_step(x, positions, valid, caches, write_idx, mask)
        h_out = h[torch.arange(n, device=dev), lens - 1]  # (n, d)
        ctrl_logits, text_logits = model.predict(h_out)

        seeds = [p.session.seed for p in by_row]
        ticks = self.tick[:n].tolist()
        noise = torch.stack([flow_noise(s, k, cfg.frames_per_tick, cfg.n_mels) for s, k in zip(seeds, ticks)])
        mel = model.sample_mel(h_out, noise.to(dev))  # (n, F, M)
        ctrl, text = self._choose(ctrl_logits, text_logits, seeds, ticks)
        ctrl = self._requested(by_row, ctrl)
        spoken = mel.float()
        if self.mute_when_silent:  # "silent" means silence: the control token decides, not a harness
            spoken = torch.where((ctrl == CONTROLS.index("silent"))[:, None, None], self.cfg.mel_floor, spoken)
        pcm, voc_state = self.vocoder(spoken, {k: v[:n] for k, v in self.voc_state.items()})

        # Text ends at the first non-byte token (EOT, pad, ...): that token is fed back, later ones become pad.
        stop = (text >= 256).long()
        ended = torch.cumsum(stop, dim=1) > 0  # at or after the end
        fed_text = torch.where(torch.cumsum(stop, dim=1) - stop > 0, tk.pad_id, text)

        traced = [inp.row(i) for i in range(n)] if self.trace else None  # before the state below changes

        # Commit the new state.
        self.pos[:n] += lens
        self.tick[:n] += 1
        self.prev_ctrl[:n] = ctrl
        self.prev_text[:n] = fed_text
        self.prev_codes[:n] = self.dmel.quantize(spoken)  # what it actually said, heard back next tick
        self.dmel_state[:n] = dmel_state
        for k, v in voc_state.items():
            self.voc_state[k][:n] = v

        pcm_np = pcm.cpu().numpy()
        ctrl_l = ctrl.tolist()
        text_l = torch.where(ended, -1, text).tolist()
        step_ms = (time.perf_counter() - t0) * 1000.0
        outs = []
        for i, p in enumerate(by_row):
            s, c = p.session, p.chunk
            s.last_seq = c.seq
            said = s.decoder.feed([b for b in text_l[i] if b >= 0])
            if self.trace:
                s.trace.append({
                    "inputs": traced[i], "noise": noise[i], "ctrl_logits": ctrl_logits[i].cpu(),
                    "text_logits": text_logits[i].cpu(), "mel": mel[i].cpu(), "ctrl": ctrl_l[i], "text": text[i].cpu(),
                })
            outs.append(OutputChunk(s.sid, c.seq, c.t_start, pcm_np[i], said, [CONTROLS[ctrl_l[i]]], step_ms=step_ms))
        return outs

    def _requested(self, by_row: list[_Planned], ctrl: torch.Tensor) -> torch.Tensor:
        """Realtime clients ask for a turn with `response.create` (and end one with
        `response.cancel`): while a requested response runs, the control is "speak" unless the
        model itself yields, so the request shapes the control tokens rather than bypassing them."""
        speak, yield_ = CONTROLS.index("speak"), CONTROLS.index("yield")
        chosen = ctrl.tolist()
        for i, p in enumerate(by_row):
            s = p.session
            for event in p.chunk.events:
                if event.get("type") == "response.create":
                    s.respond_ticks = RESPONSE_TICKS
                elif event.get("type") == "response.cancel":
                    s.respond_ticks = 0
            if s.respond_ticks > 0:
                s.respond_ticks = 0 if chosen[i] == yield_ else s.respond_ticks - 1
                chosen[i] = yield_ if chosen[i] == yield_ else speak
        return torch.tensor(chosen, dtype=ctrl.dtype, device=ctrl.device)

    def _choose(self, ctrl_logits, text_logits, seeds, ticks):
        """Greedy, or sampling at `temperature` with Gumbel noise drawn from (seed, tick)."""
        if self.temperature <= 0:
            return ctrl_logits.argmax(-1), text_logits.argmax(-1)
        gc, gt = [], []
        for s, k in zip(seeds, ticks):
            g = torch.Generator().manual_seed(_mix(s ^ 0x5DEECE66D, k))
            gc.append(-torch.log(-torch.log(torch.rand(ctrl_logits.shape[-1], generator=g).clamp_min(1e-20))))
            gt.append(-torch.log(-torch.log(torch.rand(text_logits.shape[1:], generator=g).clamp_min(1e-20))))
        tau = self.temperature
        c = (ctrl_logits.float() / tau + torch.stack(gc).to(ctrl_logits.device)).argmax(-1)
        t = (text_logits.float() / tau + torch.stack(gt).to(text_logits.device)).argmax(-1)
        return c, t

    # ---- state transfer ----
    @torch.inference_mode()
    def export_session(self, session_id: str) -> dict:
        """Everything needed to resume the session elsewhere: numpy arrays and plain values,
        picklable. The cache is exported in float32 (exact for bf16/fp16 caches too)."""
        sess = self._get(session_id)
        r = sess.row
        f32 = torch.float64 if self.dtype == torch.float64 else torch.float32
        return {
            "version": STATE_VERSION,
            "config": self.cfg.to_dict(),
            "seed": sess.seed,
            "last_seq": sess.last_seq,
            "pos": int(self.pos[r]),
            "tick": int(self.tick[r]),
            "prev_ctrl": int(self.prev_ctrl[r]),
            "prev_text": self.prev_text[r].tolist(),
            "prev_codes": self.prev_codes[r].to(torch.uint8).cpu().numpy(),
            "dmel_state": self.dmel_state[r].cpu().numpy(),
            "vocoder": {k: v[r].cpu().numpy() for k, v in self.voc_state.items()},
            "slot_pos": self.slot_pos[r].cpu().numpy(),
            "k": self.k_cache[:, r].to(f32).cpu().numpy(),
            "v": self.v_cache[:, r].to(f32).cpu().numpy(),
            "text_queue": list(sess.text_queue),
            "bg_queue": list(sess.bg_queue),
            "decoder": sess.decoder.state(),
            "respond_ticks": sess.respond_ticks,
        }

    def import_session(self, session_id: str, state: dict) -> None:
        """Add `session_id` resuming from `export_session` output (from this or another engine)."""
        if state.get("version") != STATE_VERSION:
            raise ProtocolError(f"session state version {state.get('version')!r} is not {STATE_VERSION}", "invalid_state", "state")
        mine, theirs = self.cfg.to_dict(), state.get("config", {})
        shape_keys = ("d_model", "n_layers", "n_kv_heads", "head_dim", "window", "n_sink", "text_per_tick", "bg_per_tick", "frame_size", "patch", "text_out")
        diff = [k for k in shape_keys if mine.get(k) != theirs.get(k)]
        if diff:
            raise ProtocolError(f"session state was made by a model with different {diff}", "invalid_state", "state")
        self.add_session(session_id, seed=state["seed"])
        sess = self._sessions[session_id]
        r = sess.row
        dev = self.device
        with torch.inference_mode():
            self.pos[r] = state["pos"]
            self.tick[r] = state["tick"]
            self.prev_ctrl[r] = state["prev_ctrl"]
            self.prev_text[r] = torch.tensor(state["prev_text"], device=dev)
            self.prev_codes[r] = torch.from_numpy(np.asarray(state["prev_codes"])).to(dev).long()
            self.dmel_state[r] = torch.from_numpy(np.asarray(state["dmel_state"])).to(dev)
            for k, v in state["vocoder"].items():
                self.voc_state[k][r] = torch.from_numpy(np.asarray(v)).to(dev)
            self.slot_pos[r] = torch.from_numpy(np.asarray(state["slot_pos"])).to(dev)
            self.k_cache[:, r] = torch.from_numpy(np.asarray(state["k"])).to(dev, self.dtype)
            self.v_cache[:, r] = torch.from_numpy(np.asarray(state["v"])).to(dev, self.dtype)
        sess.last_seq = state["last_seq"]
        sess.text_queue.extend(state["text_queue"])
        sess.bg_queue.extend(state["bg_queue"])
        sess.decoder = IncrementalDecoder.from_state(state["decoder"])
        sess.respond_ticks = int(state.get("respond_ticks", 0))

    def fast_forward(self, session_id: str, ticks: int, tokens_per_tick: int, generator: torch.Generator | None = None) -> None:
        """Benchmark/test aid: put the session `ticks` micro-turns in, as if each had had
        `tokens_per_tick` tokens, with random keys/values in every slot such a session would
        occupy. Costs no forward passes."""
        sess = self._get(session_id)
        r, cfg = sess.row, self.cfg
        n_tok = ticks * tokens_per_tick
        with torch.inference_mode():
            live = torch.arange(max(0, n_tok - cfg.ring), n_tok, device=self.device)
            live = torch.cat([torch.arange(min(cfg.n_sink, n_tok), device=self.device), live[live >= cfg.n_sink]])
            slots = torch.where(live < cfg.n_sink, live, cfg.n_sink + (live - cfg.n_sink) % cfg.ring)
            self.slot_pos[r] = -1
            self.slot_pos[r, slots] = live
            shape = self.k_cache[:, r].shape
            self.k_cache[:, r] = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
            self.v_cache[:, r] = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
            self.pos[r] = n_tok
            self.tick[r] = ticks

    def state_bytes(self) -> int:
        """Bytes held in the engine's pre-sized tensors (constant for its lifetime)."""
        return sum(t.numel() * t.element_size() for t in [self.k_cache, self.v_cache, *self._row_tensors()])


def _take(q: deque, n: int) -> list[int]:
    return [q.popleft() for _ in range(min(n, len(q)))]


def _int_or(v: Any, default):
    try:
        return type(default)(v)
    except (TypeError, ValueError):
        return default
