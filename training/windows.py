"""Training windows: random crops of a dialogue, built as the engine would have built them.

`window` draws one from a `Dialogue` (a session log and its targets, `load_dialogues`): a crop of
`crop_s` seconds (a share `from_start` of them from the dialogue's first tick, so the attention
sinks also see session starts), its inputs built by `models.inputs.InputBuilder.session` from the
session's first tick, so the dMel context, fed-back outputs, clock and text queues are the
engine's. `feed_back_own_speech` makes a window hear the model's own sampled speech (and
controls) instead of the data's, as it will when serving.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import InteractionModel, TickInputs
from training.recipe import Recipe

if TYPE_CHECKING:
    from training import data


@dataclass
class Dialogue:
    session: data.Session
    targets: dict[str, torch.Tensor]


def load_dialogues(paths: list[Path], cfg: InteractionConfig) -> list[Dialogue]:
    from models.features import DMel, FeatureConfig
    from training import data

    dmel = DMel(FeatureConfig(n_mels=cfg.n_mels, levels=cfg.mel_levels, tick_ms=cfg.tick_ms))
    out = []
    for p in paths:
        s = data.read(p)
        if s.tick_ms != cfg.tick_ms:
            raise ValueError(f"{p}: tick {s.tick_ms} ms, the model's is {cfg.tick_ms} ms")
        out.append(Dialogue(s, data.targets(s, cfg.text_out, dmel)))
    return out


def crop_inputs(inp: TickInputs, a: int, b: int) -> TickInputs:
    """Rows [a, b) of a session's `TickInputs`."""
    rows = [r for r in inp.video_rows if a <= r < b]
    patches = inp.patches[[inp.video_rows.index(r) for r in rows]] if rows and inp.patches is not None else None
    return TickInputs(inp.mel_codes[a:b], inp.self_codes[a:b], inp.prev_ctrl[a:b], inp.prev_text[a:b], inp.tick[a:b],
                      patches, [r - a for r in rows], inp.text_ids[a:b], inp.bg_ids[a:b])


def window(builder: InputBuilder, d: Dialogue, rng: np.random.Generator, recipe: Recipe) -> tuple[TickInputs, dict[str, torch.Tensor]]:
    """One random window of a dialogue: its inputs (built from the session's first tick, so the
    dMel context, fed-back outputs, clock and text queues are the engine's) and targets."""
    k, tick_s = d.session.n_ticks, builder.cfg.tick_s
    n = int(round(rng.uniform(*recipe.crop_s) / tick_s))
    n = min(n, k)
    a = 0 if rng.random() < recipe.from_start else int(rng.integers(0, k - n + 1))
    b = a + n
    t = d.targets
    full = builder.session(d.session.inputs[:b], t["ctrl"][:b], t["text"][:b], t["mel"][:b], d.session.updates)
    return crop_inputs(full, a, b), {name: v[a:b] for name, v in t.items()}


def feed_back_own_speech(model: InteractionModel, builder: InputBuilder, inp: TickInputs, tgt: dict[str, torch.Tensor],
                         generator: torch.Generator, controls: bool = False) -> TickInputs:
    """The window with what the model hears itself say replaced by its own: a pass without
    gradients on the true history samples its speech for every tick, and each tick's fed-back
    codes become the previous tick's sample. Serving feeds back what the model actually said,
    rougher than the data's voice; a model that only ever heard the clean voice leans on it to
    know where it is in a turn and loses its place in free running (scheduled sampling, one step
    deep). With `controls`, the control it chose there (greedy, as the engine does) is fed back
    too, and its speech muted where that control is "silent" (else where the target's is), while
    the targets stay the data's: a model that missed the moment to stop, or started in a pause,
    learns to stop on the next tick, instead of trusting its own last control to say where it is."""
    with torch.no_grad():
        x, out_pos = model.sequence(inp)
        h, _ = model.transformer.forward_full(x, torch.arange(x.shape[1], device=x.device))
        noise = torch.randn(tgt["mel"].shape, generator=generator).to(h)
        mel = model.sample_mel(h[0, out_pos], noise)
        ctrl = model.predict(h[0, out_pos])[0].argmax(-1) if controls else tgt["ctrl"]
        silent = (ctrl == CONTROLS.index("silent")).to(mel.device)[:, None, None]
        codes = builder.dmel.quantize(torch.where(silent, torch.full_like(mel, model.cfg.mel_floor), mel).float())
    fed = inp.self_codes.clone()
    fed[1:] = codes[:-1].to(fed.dtype)
    if not controls:
        return dataclasses.replace(inp, self_codes=fed)
    prev = inp.prev_ctrl.clone()
    prev[1:] = ctrl[:-1].to(prev.dtype)
    return dataclasses.replace(inp, self_codes=fed, prev_ctrl=prev)
