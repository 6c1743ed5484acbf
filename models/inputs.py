"""`InputBuilder`: the one place chunks become model inputs, for serving, training and evaluation.

The streaming engine builds every tick with `build`; a training or evaluation loop builds a whole
logged session with `session`, and gets the `TickInputs` the engine would have built tick by tick
(tested: tests/models/test_inputs.py). For session tick k (counted from 0 at join) a row holds:

- `mel_codes`: dMel codes of chunk k's audio (`cfg.samples_per_tick` int16 samples at 16 kHz),
  causal: frame j sees the 50 ms ending at its hop, reaching 25 ms into chunk k-1.
- `self_codes`, `prev_ctrl`, `prev_text`: the model's own tick k-1 fed back: dMel codes of the
  log-mel it spoke (the silence floor where its control muted it), the control it emitted (after
  a forced control), and its text tokens up to and including the first non-byte token (EOT, pad),
  pad after. Tick 0 gets silence, "silent" and pad.
- `tick`: k, the session's clock.
- `patches`: chunk k's frame as 40x40 patches, if it brought one (`video_rows`).
- `text_ids`: typed text, queued as TXT <utf-8 bytes> EOT in arrival order (a chunk's text joins
  the queue before its own tick), entering at most `cfg.text_per_tick` tokens a tick.
- `bg_ids`: background updates likewise as BG <bytes> EOT, at most `cfg.bg_per_tick` a tick; an
  update pushed between ticks k-1 and k can enter from tick k on.

The per-session state this carries from tick to tick is declared by `rows()` and advanced by
`next_state`; the text queues live in `TextQueues`.
"""

from __future__ import annotations

from collections import deque
from typing import Mapping, Sequence

import numpy as np
import torch

from models.config import CONTROLS, InteractionConfig
from models.features import DMel, FeatureConfig, patchify
from models.model import TickInputs
from models.session_state import Row, TextQueues
from models.tokenizer import ByteTokenizer
from protocols.chunks import InputChunk, ProtocolError, check_text

SILENT = CONTROLS.index("silent")


class InputBuilder:
    def __init__(self, cfg: InteractionConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.tokenizer = ByteTokenizer()
        self.features = FeatureConfig(n_mels=cfg.n_mels, levels=cfg.mel_levels, tick_ms=cfg.tick_ms)
        self.dmel = DMel(self.features).to(self.device)
        with torch.inference_mode():
            silent_logmel = torch.full((1, cfg.frames_per_tick, cfg.n_mels), cfg.mel_floor)
            self.silence_codes = self.dmel.quantize(silent_logmel)[0]  # (F, M)

    # ---- per-session state ----
    def rows(self) -> dict[str, Row]:
        """The tensors an input carries from one tick to the next, and a new session's values."""
        c, f = self.cfg, self.features
        return {
            "tick": Row((), torch.long, 0),
            "dmel_state": Row((f.win - f.hop,), torch.float32, 0.0),
            "prev_ctrl": Row((), torch.long, SILENT),
            "prev_text": Row((c.text_out,), torch.long, self.tokenizer.pad_id),
            "prev_codes": Row((c.frames_per_tick, c.n_mels), torch.long, self.silence_codes),
        }

    def next_state(self, state: dict[str, torch.Tensor], dmel_state: torch.Tensor, ctrl: torch.Tensor, text: torch.Tensor,
                   logmel: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows' values for the next tick, from this tick's `state`, the dMel context `build`
        returned, and what the model emitted (see `feedback`)."""
        return {"tick": state["tick"] + 1, "dmel_state": dmel_state, **self.feedback(ctrl, text, logmel)}

    def feedback(self, ctrl: torch.Tensor, text: torch.Tensor, logmel: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the model emitted, ctrl (B,), text (B, N), spoken log-mel (B, F, M), as the next
        tick's prev_ctrl, prev_text and prev_codes."""
        return {"prev_ctrl": ctrl, "prev_text": self.fed_text(text), "prev_codes": self.dmel.quantize(logmel)}

    def fed_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, N) predicted tokens -> what is fed back: up to and including the first non-byte
        token, pad after."""
        stop = (text >= 256).long()
        after_end = torch.cumsum(stop, dim=1) - stop > 0
        return torch.where(after_end, self.tokenizer.pad_id, text)

    # ---- text ----
    def queue_text(self, queues: TextQueues, text: str) -> None:
        """Queue typed text (nothing for ""); refused whole, changing nothing, when the queue is full."""
        if text:
            self._queue(queues.text, [self.tokenizer.txt_id, *self.tokenizer.encode(check_text(text)), self.tokenizer.eot_id], "text")

    def queue_update(self, queues: TextQueues, text: str) -> None:
        self._queue(queues.bg, [self.tokenizer.bg_id, *self.tokenizer.encode(check_text(text, "update")), self.tokenizer.eot_id], "update")

    def _queue(self, q: deque, ids: list[int], param: str) -> None:
        if len(q) + len(ids) > self.cfg.max_queued_tokens:
            raise ProtocolError(f"the {param} queue is full ({self.cfg.max_queued_tokens} tokens)", "queue_full", param)
        q.extend(ids)

    def take(self, queues: TextQueues) -> tuple[list[int], list[int]]:
        """This tick's typed-text and background tokens, taken from a session's queues."""
        return _take(queues.text, self.cfg.text_per_tick), _take(queues.bg, self.cfg.bg_per_tick)

    # ---- one tick, a batch of sessions ----
    def build(self, chunks: Sequence[InputChunk], tokens: Sequence[tuple[list[int], list[int]]],
              state: dict[str, torch.Tensor]) -> tuple[TickInputs, torch.Tensor]:
        """Tick inputs for a batch of sessions: row i is chunks[i] (already validated), tokens[i]
        (from `take`) and state[name][i] (the `rows()` of that session).
        -> inputs, and the new dMel context for `next_state`."""
        cfg, dev = self.cfg, self.device
        audio = torch.from_numpy(np.stack([c.audio for c in chunks])).to(dev)  # (B, S) int16
        logmel, dmel_state = self.dmel(audio, state["dmel_state"])
        codes = self.dmel.quantize(logmel)  # (B, F, M)
        video = [(i, c.frame) for i, c in enumerate(chunks) if c.frame is not None]
        video_rows = [i for i, _ in video]
        patches = None
        if video:
            frames = torch.from_numpy(np.stack([frame for _, frame in video])).to(dev)
            patches = patchify(frames, cfg.patch)  # (Bv, P, 3, p, p)
        inputs = TickInputs(codes, state["prev_codes"], state["prev_ctrl"], state["prev_text"], state["tick"],
                            patches, video_rows, [list(t) for t, _ in tokens], [list(b) for _, b in tokens])
        return inputs, dmel_state

    # ---- a whole logged session ----
    @torch.no_grad()  # not inference mode: training runs autograd over what this returns
    def session(self, chunks: Sequence[InputChunk], ctrl: torch.Tensor, text: torch.Tensor, logmel: torch.Tensor,
                updates: Mapping[int, Sequence[str]] | None = None) -> TickInputs:
        """K consecutive ticks of ONE session from its first tick, as a batch of K rows (for
        `InteractionModel.loss` / `reference_forward`): what the engine builds tick by tick.

        chunks: the session's inputs for ticks 0..K-1 (seq in order, one tick of audio each).
        ctrl (K,), text (K, N), logmel (K, F, M): what the model emitted at each tick, fed back
        at the next (in training, the targets: teacher forcing; row K-1 is not used).
        updates: background update texts pushed just before tick k, by k.
        """
        k = len(chunks)
        s = self.features.samples_per_chunk
        if any(c.audio.shape != (s,) for c in chunks):
            raise ProtocolError(f"every chunk must hold {s} samples (one {self.cfg.tick_ms} ms tick)", "invalid_audio", "audio")
        dev = self.device
        # Each tick's dMel context is the previous chunk's tail, exactly as streaming carries it.
        ctx = self.features.win - self.features.hop
        audio = torch.from_numpy(np.stack([c.audio for c in chunks])).to(dev)  # (K, S) int16
        tails = torch.cat([torch.zeros(1, ctx, device=dev), audio[:-1, -ctx:].float() / 32768.0])
        fed, fresh = self.feedback(ctrl.to(dev), text.to(dev), logmel.to(dev).float()), self.rows()
        state = {"tick": torch.arange(k, device=dev), "dmel_state": tails}
        for name, v in fed.items():  # tick k is fed tick k-1's output; tick 0 a new session's
            first = torch.as_tensor(fresh[name].fresh, dtype=torch.long, device=dev).expand(1, *fresh[name].shape)
            state[name] = torch.cat([first, v[:-1]])

        queues, tokens = TextQueues(), []
        for i, c in enumerate(chunks):
            for u in (updates or {}).get(i, ()):
                self.queue_update(queues, u)
            self.queue_text(queues, c.text)
            tokens.append(self.take(queues))
        return self.build(chunks, tokens, state)[0]


def _take(q: deque, n: int) -> list[int]:
    return [q.popleft() for _ in range(min(n, len(q)))]
