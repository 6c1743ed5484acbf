"""`EngineStep`: one tick of a `StreamingEngine`, one batched forward pass for every session
(on top of `EngineRows`, the sessions and the rows holding their state).

`step(chunks)` reads top to bottom:
- validate: each chunk is checked once (its background updates, then its text, join the session's
  queues); a bad or absent one is reported under its session id and that session is stepped as
  missing (silence), so clocks stay aligned and no session stops another;
- prepare: `InputBuilder` (models/inputs.py) turns the live sessions' chunks, queued text and
  fed-back outputs into `TickInputs`;
- execute: one forward pass for the whole batch against the persistent KV cache, the heads, the
  control decision (a chunk's `forced` control holds unless the model chose "yield"), the vocoder;
- commit: every session's state advances by one tick and the outputs are made.

Each row's KV cache holds `n_sink` sink positions (kept forever) and a ring of the last
`window + one tick` positions, keys stored already rotated at their absolute positions, so a
tick's cost and the engine's memory are bounded however long a session runs. A session's outputs
depend only on its own inputs and seed, never on who else is in the batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch

from models.config import CONTROLS
from models.engine_rows import EngineRows
from models.model import InteractionModel, TickInputs, _mix, flow_noise
from models.session_state import Session
from models.step_checks import validate
from models.transformer import additive_mask, visible
from models.vocoder import Vocoder
from protocols.chunks import InputChunk, OutputChunk, ProtocolError, check_audio

SILENT, YIELD = CONTROLS.index("silent"), CONTROLS.index("yield")
SPEAK, DELEGATE = CONTROLS.index("speak"), CONTROLS.index("delegate")
VOCODER = "vocoder."  # prefix of the vocoder's state among the rows


@dataclass
class Decision:
    """What one tick's forward pass produced for the live rows, in row order."""

    lens: torch.Tensor  # (n,) tokens each row added to its sequence
    noise: torch.Tensor  # (n, F, M) the flow head's starting noise
    ctrl_logits: torch.Tensor  # (n, C)
    text_logits: torch.Tensor  # (n, N, V)
    mel: torch.Tensor  # (n, F, M) the flow head's log-mel
    ctrl: torch.Tensor  # (n,) the control emitted (a forced control applied)
    text: torch.Tensor  # (n, N) the text tokens chosen
    spoken: torch.Tensor  # (n, F, M) float32 log-mel spoken: `mel`, or the silence floor where muted
    pcm: torch.Tensor  # (n, samples) int16
    vocoder: dict[str, torch.Tensor]  # the vocoder's next state


class EngineStep(EngineRows):
    """The tick of `StreamingEngine`, which sets these attributes."""

    model: InteractionModel
    vocoder: Vocoder
    device: torch.device
    dtype: torch.dtype
    temperature: float
    mute_when_silent: bool
    onset_margin: float

    def step(self, chunks: list[InputChunk]) -> tuple[list[OutputChunk], dict[str, ProtocolError]]:
        """One batched micro-turn for every session: at most one chunk per session, any order.

        A bad chunk never stops the others: its session is stepped as missing (silence, the seq
        it should have had) and the error is returned under its session id (or a short repr of
        the chunk when it names no session); a session with no chunk is stepped as missing and
        reported too. Returns one output per session (those of good chunks first, in their order,
        then those stepped as missing) and the errors.

        Seqs only move forward: a chunk whose seq is not after its session's last is refused. A
        forward gap (ticks shed under overload, or while a session moved between engines) is
        accepted: the ticks skipped are absent from the session's history, whose clock counts the
        micro-turns stepped, so a replay of the same chunks sees the same gap.
        """
        t0 = time.perf_counter()
        accepted, errors = self._validate(chunks)
        if not self._by_row:
            return [], errors
        sessions = [self._sessions[sid] for sid in self._by_row]
        batch = [accepted[sid] for sid in self._by_row]
        with torch.inference_mode():
            inputs, dmel_state = self.prepare(sessions, batch)
            decision = self.execute(sessions, batch, inputs)
            outs = self.commit(sessions, batch, dmel_state, decision, t0)
        return [outs[self._sessions[sid].row] for sid in accepted], errors

    def _validate(self, chunks: list[Any]) -> tuple[dict[str, InputChunk], dict[str, ProtocolError]]:
        """-> a chunk for every live session, and the errors (`models.step_checks.validate`)."""
        return validate(chunks, self._check, list(self._by_row), lambda sid, like: self._missing(self._sessions[sid], like))

    def _check(self, chunk: InputChunk) -> tuple[str, InputChunk]:
        """The one validation past `models.step_checks.validate`'s: a private copy of the chunk,
        re-checked whole (fields may have changed since it was made), then against this model.
        Queues its text last, so a refused chunk changes nothing."""
        sess = self._get(chunk.session_id)
        sid = sess.sid
        try:
            check_audio(chunk.audio, samples=self.cfg.samples_per_tick)
            chunk = dataclasses.replace(chunk)
            fs = self.cfg.frame_size
            if chunk.frame is not None and chunk.frame.shape != (fs, fs, 3):
                raise ProtocolError(f"frame must be {fs}x{fs}x3 for this model, got {chunk.frame.shape[0]}x{chunk.frame.shape[1]}", "invalid_frame", "frame")
            if sess.last_seq is not None and chunk.seq <= sess.last_seq:
                raise ProtocolError(f"seq {chunk.seq} out of order, expected {sess.last_seq + 1} or later", "out_of_order", "seq")
            self._queue(sess, chunk)
        except ProtocolError as e:
            raise ProtocolError(f"session {sid!r}: {e}", e.code, e.param) from None
        return sid, chunk

    def _queue(self, sess: Session, chunk: InputChunk) -> None:
        """Queue the chunk's background updates, then its typed text; all or nothing."""
        q = sess.queues
        n_text, n_bg = len(q.text), len(q.bg)
        try:
            for text in chunk.updates:
                self.inputs.queue_update(q, text)
            self.inputs.queue_text(q, chunk.text)
        except ProtocolError:
            while len(q.text) > n_text:
                q.text.pop()
            while len(q.bg) > n_bg:
                q.bg.pop()
            raise

    def _missing(self, sess: Session, like: Any = None) -> InputChunk:
        """Silence in place of a refused or absent chunk: at the refused chunk's seq where that is
        a valid next one (a forward gap included), else the tick after the last."""
        seq = _int_or(getattr(like, "seq", -1), -1)
        if seq < 0 or (sess.last_seq is not None and seq <= sess.last_seq):
            seq = sess.last_seq + 1 if sess.last_seq is not None else 0
        t_start = _int_or(getattr(like, "t_start", 0.0), 0.0)
        return InputChunk.silent(sess.sid, seq, t_start, self.cfg.samples_per_tick)

    def prepare(self, sessions: list[Session], chunks: list[InputChunk]) -> tuple[TickInputs, torch.Tensor]:
        """The live rows' model inputs (row order), and their next dMel context."""
        tokens = [self.inputs.take(s.queues) for s in sessions]
        return self.inputs.build(chunks, tokens, self.rows.live(len(sessions)))

    def execute(self, sessions: list[Session], chunks: list[InputChunk], inputs: TickInputs) -> Decision:
        """The forward pass. Writes this tick's keys and values into the cache (the ring holds a
        tick more than the window, so no key this tick still reads is overwritten); every other
        row state is left for `commit`."""
        cfg, model, dev = self.cfg, self.model, self.device
        n = len(sessions)
        live = self.rows.live(n)
        x, lens = model.embed(inputs)  # (n, T, d), (n,)
        positions, valid, write_idx, mask = self._cache_slots(live, lens, x.shape[1])
        caches = [(self.rows["k"][i], self.rows["v"][i]) for i in range(cfg.n_layers)]
        h = model.transformer.forward_step(x, positions, valid, caches, write_idx, mask)
        h_out = h[torch.arange(n, device=dev), lens - 1]  # (n, d): the OUT tokens
        ctrl_logits, text_logits = model.predict(h_out)

        seeds, ticks = [s.seed for s in sessions], live["tick"].tolist()
        noise = torch.stack([flow_noise(s, k, cfg.frames_per_tick, cfg.n_mels) for s, k in zip(seeds, ticks)]).to(dev)
        mel = model.sample_mel(h_out, noise)  # (n, F, M)
        ctrl, text = self._choose(self._onset(ctrl_logits, inputs.prev_ctrl), text_logits, seeds, ticks)
        ctrl = self._forced(ctrl, chunks)
        spoken = mel.float()
        if self.mute_when_silent:  # "silent" means silence: the control token decides, not a harness
            spoken = torch.where((ctrl == SILENT)[:, None, None], cfg.mel_floor, spoken)
        voc = {name[len(VOCODER):]: t for name, t in live.items() if name.startswith(VOCODER)}
        pcm, voc = self.vocoder(spoken, voc)
        return Decision(lens, noise, ctrl_logits, text_logits, mel, ctrl, text, spoken, pcm, voc)

    def commit(self, sessions: list[Session], chunks: list[InputChunk], dmel_state: torch.Tensor, d: Decision, t0: float) -> list[OutputChunk]:
        """Advance every live row by one tick and make the outputs (row order)."""
        n = len(sessions)
        live = self.rows.live(n)
        self.rows.write(n, {
            "pos": live["pos"] + d.lens,
            **self.inputs.next_state(live, dmel_state, d.ctrl, d.text, d.spoken),  # it hears what it actually said
            **{VOCODER + name: t for name, t in d.vocoder.items()},
        })
        pcm, ctrl, text = d.pcm.cpu().numpy(), d.ctrl.tolist(), d.text.tolist()
        step_ms = (time.perf_counter() - t0) * 1000.0
        outs = []
        for i, (s, c) in enumerate(zip(sessions, chunks)):
            s.last_seq = c.seq
            said = s.decoder.feed(list(itertools.takewhile(lambda t: t < 256, text[i])))  # bytes up to the first non-byte token
            outs.append(OutputChunk(s.sid, c.seq, c.t_start, pcm[i], said, [CONTROLS[ctrl[i]]], step_ms=step_ms))
        return outs

    def _cache_slots(self, live: dict[str, torch.Tensor], lens: torch.Tensor, t: int):
        """Cache addressing for this tick's tokens: absolute positions (n, T), which are real
        (n, T), flat write indices into each layer's cache for the real ones, and the additive
        attention mask (n, 1, G*T, S). Records the new slots' positions in `slot_pos`; pad tokens
        are neither written nor visible."""
        cfg, dev = self.cfg, self.device
        n = lens.shape[0]
        ar = torch.arange(t, device=dev)
        positions = live["pos"][:, None] + ar  # (n, T)
        valid = ar[None] < lens[:, None]
        ring_slot = cfg.n_sink + (positions - cfg.n_sink) % cfg.ring
        slots = torch.where(positions < cfg.n_sink, positions, ring_slot)
        rows_v = torch.arange(n, device=dev)[:, None].expand(n, t)[valid]
        slots_v = slots[valid]
        slot_pos = live["slot_pos"]
        slot_pos[rows_v, slots_v] = positions[valid]
        kv = cfg.n_kv_heads
        write_idx = ((rows_v[:, None] * kv + torch.arange(kv, device=dev)) * cfg.cache_len + slots_v[:, None]).reshape(-1)
        mask = visible(positions[:, :, None], slot_pos[:, None, :], cfg.n_sink, cfg.window)  # (n, T, S)
        mask = additive_mask(mask.repeat(1, cfg.n_heads // kv, 1)[:, None], self.dtype)  # (n, 1, G*T, S)
        return positions, valid, write_idx, mask

    def _forced(self, ctrl: torch.Tensor, chunks: list[InputChunk]) -> torch.Tensor:
        """A chunk's forced control replaces the model's choice, except a "yield": the request
        shapes the control tokens rather than bypassing them."""
        forced = torch.tensor([CONTROLS.index(c.forced) if c.forced else -1 for c in chunks], dtype=ctrl.dtype, device=ctrl.device)
        return torch.where((forced >= 0) & (ctrl != YIELD), forced, ctrl)

    def _onset(self, ctrl_logits: torch.Tensor, prev_ctrl: torch.Tensor) -> torch.Tensor:
        """Control logits with `onset_margin` taken off speaking for the quiet sessions."""
        if self.onset_margin == 0.0:
            return ctrl_logits
        quiet = ((prev_ctrl == SILENT) | (prev_ctrl == DELEGATE)).to(ctrl_logits.device)
        out = ctrl_logits.float().clone()
        out[:, [SPEAK, YIELD]] -= self.onset_margin * quiet[:, None].float()
        return out

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


def _int_or(v: Any, default):
    try:
        return type(default)(v)
    except (TypeError, ValueError):
        return default
