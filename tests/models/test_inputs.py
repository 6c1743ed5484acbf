"""InputBuilder: a logged session rebuilt in one call gives exactly the inputs serving built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.inputs import InputBuilder
from models.model import InteractionModel, TickInputs
from protocols.chunks import CONTROLS, ProtocolError
from tests.models.helpers import TracingEngine, make_chunk, micro, step_ok

UPDATES = {7: ["weather: sunny, 21C"], 9: ["second result", "third"]}


def _served(ticks=24, tick_ms=200):
    """Two sessions served tick by tick, with typed text, updates, frames and forced controls;
    returns the engine (with what each tick saw) and each session's logged chunks."""
    torch.manual_seed(0)
    eng = TracingEngine(micro(tick_ms=tick_ms, window=40), max_sessions=3)
    log = {"a": [], "b": []}
    for s in log:
        eng.add_session(s)
    for k in range(ticks):
        for u in UPDATES.get(k, ()):
            eng.push_update("a", u)
        chunks = [make_chunk("a", k, 0, tick_ms=tick_ms, text="hello there" if k in (2, 3) else "", forced="speak" if 4 <= k < 8 else None),
                  make_chunk("b", k, 1, tick_ms=tick_ms, video_every=2, forced="silent" if k == 5 else None)]
        step_ok(eng, chunks)
        for c in chunks:
            log[c.session_id].append(c)
    return eng, log


def _emitted(trace):
    return (torch.tensor([t["ctrl"] for t in trace]), torch.stack([t["text"] for t in trace]),
            torch.stack([t["spoken"] for t in trace]))


@pytest.mark.parametrize("tick_ms", [200, 100])
def test_a_logged_session_builds_the_inputs_serving_built(tick_ms):
    eng, log = _served(tick_ms=tick_ms)
    builder = InputBuilder(eng.cfg)
    for sid in ("a", "b"):
        trace = eng.trace[sid]
        served = TickInputs.cat([t["inputs"] for t in trace])
        built = builder.session(log[sid], *_emitted(trace), updates=UPDATES if sid == "a" else None)
        for name in ("mel_codes", "self_codes", "prev_ctrl", "prev_text", "tick", "patches"):
            assert torch.equal(getattr(built, name), getattr(served, name)), name
        assert (built.video_rows, built.text_ids, built.bg_ids) == (served.video_rows, served.text_ids, served.bg_ids)
    a = [t["inputs"] for t in eng.trace["a"]]
    assert any(i.bg_ids[0] for i in a[7:12]) and any(i.text_ids[0] for i in a[2:5])
    assert all(CONTROLS[int(i.prev_ctrl)] in ("speak", "yield") for i in a[5:9])  # forced ticks are fed back as emitted


def test_built_inputs_train():
    """What the builder gives a training loop carries gradients (no inference-mode tensors)."""
    eng, log = _served(ticks=6)
    ctrl, text, spoken = _emitted(eng.trace["a"])
    inputs = InputBuilder(eng.cfg).session(log["a"], ctrl, text, spoken)
    model = InteractionModel(eng.cfg)
    parts = model.loss(inputs, {"ctrl": ctrl, "text": text, "mel": spoken})
    parts["loss"].backward()
    assert model.embed_in.tok.weight.grad is not None


def test_chunks_of_the_wrong_length_are_refused():
    builder = InputBuilder(micro())
    chunks = [make_chunk("a", k, 0, tick_ms=400) for k in range(2)]
    f, m, n = builder.cfg.frames_per_tick, builder.cfg.n_mels, builder.cfg.text_out
    with pytest.raises(ProtocolError, match="3200 samples"):
        builder.session(chunks, torch.zeros(2, dtype=torch.long), torch.zeros(2, n, dtype=torch.long), torch.zeros(2, f, m))
    assert np.all(builder.silence_codes.numpy() == 0)
