"""Training windows: a window can hear the model's own speech, and its own controls, fed back."""

from __future__ import annotations

import numpy as np
import torch

from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import build_model
from training.recipe import Recipe
from training.windows import feed_back_own_speech, load_dialogues, window

CFG = InteractionConfig.preset("tiny")


def test_a_window_can_hear_the_model_s_own_speech_and_controls(tiny_set):
    """Scheduled sampling: each tick hears the speech the model sampled for the tick before (the
    engine's feedback), silence where the data is silent; nothing else in the window changes."""
    builder, model = InputBuilder(CFG), build_model(CFG).eval()
    d = load_dialogues(sorted((tiny_set / "train").glob("*.parquet"))[:1], CFG)[0]
    r = Recipe(data=str(tiny_set), batch=2, warmup=1, crop_s=(60.0, 60.0), from_start=1.0)  # the whole dialogue
    inp, tgt = window(builder, d, np.random.default_rng(0), r)
    fed = feed_back_own_speech(model, builder, inp, tgt, torch.Generator().manual_seed(0))
    silent = tgt["ctrl"][:-1] == CONTROLS.index("silent")
    assert silent.any() and (~silent).any()
    assert torch.equal(fed.self_codes[0], inp.self_codes[0])  # the tick before the window is the data's
    assert all(torch.equal(fed.self_codes[k + 1], builder.silence_codes) for k in torch.nonzero(silent).flatten().tolist())
    spoken = torch.nonzero(~silent).flatten() + 1
    assert not torch.equal(fed.self_codes[spoken], inp.self_codes[spoken])  # random weights say something else
    for name in ("mel_codes", "prev_ctrl", "prev_text", "tick"):
        assert torch.equal(getattr(fed, name), getattr(inp, name)), name

    # With its controls too: each tick hears the control it chose the tick before (greedy, as the
    # engine chooses), its speech muted where that was "silent"; the rest is the data's.
    own = feed_back_own_speech(model, builder, inp, tgt, torch.Generator().manual_seed(0), controls=True)
    with torch.no_grad():
        x, out_pos = model.sequence(inp)
        h, _ = model.transformer.forward_full(x, torch.arange(x.shape[1]))
        chosen = model.predict(h[0, out_pos])[0].argmax(-1)
    assert torch.equal(own.prev_ctrl[1:], chosen[:-1]) and own.prev_ctrl[0] == inp.prev_ctrl[0]
    assert not torch.equal(chosen, tgt["ctrl"])  # random weights choose otherwise than the data
    quiet = torch.nonzero(chosen[:-1] == CONTROLS.index("silent")).flatten().tolist()
    assert quiet and all(torch.equal(own.self_codes[k + 1], builder.silence_codes) for k in quiet)
    for name in ("mel_codes", "prev_text", "tick"):
        assert torch.equal(getattr(own, name), getattr(inp, name)), name
