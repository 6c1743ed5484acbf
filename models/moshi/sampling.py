"""`SeededLMGen`: the package's `LMGen` sampling each batch row from its own session's seed.

`LMGen` samples with the global RNG over the whole batch, so a session's tokens would depend on
who else is stepped beside it and could not be replayed from the log. Here each row's noise for a
frame is drawn from `numpy.random.default_rng([seed, frame])` (the session's seed and the frame's
index in the session): a pure function of the session, not of the batch or of earlier draws. A
token is drawn by the Gumbel-max trick over the top-k logits: argmax(logit / temperature + Gumbel
noise) is a draw from softmax(logit / temperature) restricted to the top k, the distribution the
package's `sample_token` draws from. Temperature 0 is argmax, as the package's greedy mode.

Package internals this relies on (moshi==0.2.13, moshi/models/lm.py): `LMGen._step` calls
`on_text_logits_hook(text_logits)` (B, 1, 1, text_card) before it picks the text token, then
`on_text_hook(text_token)` with the (B,) tensor it goes on to feed to the depformer and its
cache, so a token written into it in place is the one used; the audio tokens come from
`self.depformer_step(text_token, transformer_out)` (through `CUDAGraphed` on GPU, so the noise
lives in fixed buffers), overridden here with the package's loop (`lm_model.depformer.streaming`,
`lm_model.forward_depformer`) and this sampling. Classifier-free guidance (`cfg_coef`) is not
supported.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from moshi.models.lm import LMGen


def sample(logits: torch.Tensor, temperature: float, gumbel: torch.Tensor | None) -> torch.Tensor:
    """logits (B, card) float, gumbel (B, k) -> tokens (B,): a draw from the top k at
    `temperature` (the i-th largest logit takes the i-th noise), or argmax at temperature 0."""
    if temperature <= 0 or gumbel is None:
        return logits.argmax(-1)
    vals, idx = logits.topk(gumbel.shape[-1], -1)  # (B, k), largest first
    return idx.gather(-1, (vals / temperature + gumbel).argmax(-1, keepdim=True))[:, 0]


def top_k_of(top_k: int, card: int) -> int:
    """How many candidates a draw is over: `top_k`, or all of `card` for 0."""
    return min(top_k, card) if top_k > 0 else card


class SeededLMGen(LMGen):
    """`LMGen` with per-row seeded sampling. Before each `step`, `draw` the frame's noise for the
    rows being stepped; rows not drawn keep stale noise (they are stepped with the exec mask off)."""

    def __init__(self, lm_model, temperature: float, top_k: int, temperature_text: float, top_k_text: int,
                 on_text_hook: Callable[[torch.Tensor], None] | None = None):
        super().__init__(lm_model, use_sampling=False, temp=temperature, top_k=top_k, temp_text=temperature_text,
                         top_k_text=top_k_text, support_out_of_sync=True,
                         on_text_logits_hook=self._sample_text, on_text_hook=self._use_text)
        self.then_text_hook = on_text_hook
        self.k_text = top_k_of(top_k_text, lm_model.text_card)
        self.k_audio = top_k_of(top_k, lm_model.card)
        self._text_token: torch.Tensor | None = None
        self._text_noise: torch.Tensor | None = None  # (B, k_text), fixed storage
        self._audio_noise: torch.Tensor | None = None  # (B, dep_q, k_audio), fixed storage

    def draw(self, rows: list[tuple[int, int, int]]) -> None:
        """This frame's noise for each (row, seed, frame): text first, then codebook by codebook."""
        state = self._streaming_state
        assert state is not None, "draw() is for a streaming LMGen"
        B, dep_q = state.batch_size, self.lm_model.dep_q
        if self._text_noise is None or self._audio_noise is None:
            self._text_noise = torch.zeros(B, self.k_text, device=self.lm_model.device)
            self._audio_noise = torch.zeros(B, dep_q, self.k_audio, device=self.lm_model.device)
        if self.temp_text <= 0 and self.temp <= 0:
            return
        text = np.zeros((B, self.k_text), np.float32)
        audio = np.zeros((B, dep_q, self.k_audio), np.float32)
        for row, seed, frame in rows:
            rng = np.random.default_rng([seed % 2**64, frame])
            text[row] = rng.gumbel(size=self.k_text)
            audio[row] = rng.gumbel(size=(dep_q, self.k_audio))
        self._text_noise.copy_(torch.from_numpy(text))
        self._audio_noise.copy_(torch.from_numpy(audio))

    def _sample_text(self, text_logits: torch.Tensor) -> None:
        self._text_token = sample(text_logits[:, 0, 0].float(), self.temp_text, self._text_noise)  # (B,)

    def _use_text(self, text_token: torch.Tensor) -> None:
        assert self._text_token is not None  # drawn by _sample_text, which the package calls first
        text_token.copy_(self._text_token)
        if self.then_text_hook is not None:
            self.then_text_hook(text_token)

    def depformer_step(self, text_token: torch.Tensor, transformer_out: torch.Tensor) -> torch.Tensor:
        """The package's depformer loop, each codebook drawn with `sample`. -> (B, dep_q)."""
        assert self.cfg_coef == 1.0, "classifier-free guidance is not supported"
        lm = self.lm_model
        assert lm.depformer is not None, "a Moshi-family LM has a depformer"
        prev, tokens = text_token, []
        noise = self._audio_noise if self.temp > 0 else None
        with lm.depformer.streaming(text_token.shape[0]):
            for cb in range(lm.dep_q):
                logits = lm.forward_depformer(cb, prev[:, None, None], transformer_out)  # (B, 1, 1, card)
                prev = sample(logits[:, 0, 0].float(), self.temp, None if noise is None else noise[:, cb])  # (B,)
                tokens.append(prev)
        return torch.stack(tokens, 1)
