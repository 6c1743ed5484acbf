"""Training: a few steps lower the loss, a resumed run is the uninterrupted one exactly, and the
shipped checkpoint loads, streams, and takes the turn after a question but not in a pause."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import build_model
from training import data
from training.dialogues import generate
from training.generate import HELDOUT_SEED0, generate_set
from training.loss import loss_parts
from training.recipe import Recipe
from training.script import DialogueConfig
from training.train_loop import train_loop
from training.train_state import STATE_FILE
from training.voices import Synth
from training.windows import feed_back_own_speech, load_dialogues, window

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
CFG = InteractionConfig.preset("tiny")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_set(root, 2, 0, cfg=DialogueConfig.from_model(CFG), cache_dir=root / "cache", workers=0, progress=None)
    return root


def recipe(root: Path, **kw) -> Recipe:
    return Recipe(data=str(root), batch=2, warmup=1, crop_s=(4.0, 6.0), **kw)


def config(r: Recipe, where: Path, **kw) -> dict:
    return {"recipe": r.to_dict(), "out": str(where / "out"), "state": str(where / "state"), "threads": 1,
            "save_every_s": 1e9, "log_every": 1, **kw}


def test_a_few_training_steps_decrease_the_loss(tiny_set, tmp_path):
    r = recipe(tiny_set, steps=6, lr=3e-3)
    torch.manual_seed(r.seed)
    before = build_model(CFG)  # the run's initial weights
    train_loop(config(r, tmp_path))
    after = load_checkpoint(tmp_path / "state", dtype=torch.float32)
    d = load_dialogues(sorted((tiny_set / "train").glob("*.parquet"))[:1], CFG)[0]
    inp, tgt = window(InputBuilder(CFG), d, np.random.default_rng(123), r)

    def loss(model):
        with torch.no_grad():
            parts = loss_parts(model.train(), inp, tgt, torch.ones(len(CONTROLS)), torch.Generator().manual_seed(0))
        return {k: float(v) for k, v in parts.items()}

    lb, la = loss(before), loss(after)
    assert la["loss"] < lb["loss"] - 1.0, (lb, la)
    assert la["ctrl"] < lb["ctrl"] and la["text"] < lb["text"] and la["flow"] < lb["flow"], (lb, la)
    # What serve loads: bfloat16 weights with their config, the state's weights rounded.
    shipped = load_checkpoint(tmp_path / "out")
    assert shipped.cfg == CFG and shipped.dtype == torch.bfloat16


def test_a_resumed_run_is_the_uninterrupted_run(tiny_set, tmp_path):
    # Its own speech fed back from step 1 and its own controls from step 3, after the interruption:
    # the schedule is a function of the step, so the resumed run feeds back the same.
    r = recipe(tiny_set, steps=4, self_feed_from=1, self_feed_controls_from=3)
    train_loop(config(r, tmp_path / "a"))
    train_loop(config(r, tmp_path / "b", stop_at=2))  # interrupted after step 2
    assert torch.load(tmp_path / "b" / "state" / STATE_FILE, weights_only=False)["step"] == 2
    train_loop(config(r, tmp_path / "b"))  # the same command again
    sa, sb = (torch.load(tmp_path / w / "state" / STATE_FILE, weights_only=False) for w in ("a", "b"))
    assert sa["step"] == sb["step"] == 4
    assert [{k: v for k, v in h.items() if k != "t"} for h in sa["history"]] == [{k: v for k, v in h.items() if k != "t"} for h in sb["history"]]
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    ma, mb = (load_checkpoint(tmp_path / w / "state").state_dict() for w in ("a", "b"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_a_window_can_hear_the_model_s_own_speech_and_controls(tiny_set):
    """Scheduled sampling: each tick hears the speech the model sampled for the tick before (the
    engine's feedback), silence where the data is silent; nothing else in the window changes."""
    import dataclasses

    builder, model = InputBuilder(CFG), build_model(CFG).eval()
    d = load_dialogues(sorted((tiny_set / "train").glob("*.parquet"))[:1], CFG)[0]
    r = dataclasses.replace(recipe(tiny_set), crop_s=(60.0, 60.0), from_start=1.0)  # the whole dialogue
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


@pytest.fixture(scope="module")
def heldout_pause(tmp_path_factory):
    """A held-out dialogue (seed and voice never trained on): a thinking pause mid-utterance,
    then two turn ends the model should answer."""
    root = tmp_path_factory.mktemp("heldout")
    d = generate(HELDOUT_SEED0 + 1, "pause", "heldout", DialogueConfig.from_model(CFG), Synth(root / "cache"))
    return data.read(data.save(d, root))


def test_the_shipped_checkpoint_is_the_default_and_streams(heldout_pause):
    from actors.interaction.interaction import EngineSpec
    from deployments.config import AppConfig

    assert Path(AppConfig().model.checkpoint).resolve() == SHIPPED  # what `interplay serve` loads by default
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20
    engine = EngineSpec(checkpoint=str(SHIPPED), device="cpu", max_sessions=1).build()  # as serve builds it
    sid = heldout_pause.inputs[0].session_id
    engine.add_session(sid, seed=0)
    controls = []
    for chunk in heldout_pause.inputs:
        outs, errors = engine.step([chunk])
        assert not errors and len(outs) == 1
        controls.append(outs[0].controls[0])
    # Trained, it both listens and answers within one held-out dialogue (random weights only listen).
    assert "speak" in controls and "silent" in controls, controls


def test_the_shipped_checkpoint_speaks_after_the_question_not_in_the_pause(heldout_pause):
    from actors.interaction.interaction import EngineSpec
    from deployments.config import AppConfig

    assert Path(AppConfig().model.checkpoint).resolve() == SHIPPED  # what `interplay serve` loads by default
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20
    engine = EngineSpec(checkpoint=str(SHIPPED), device="cpu", max_sessions=1).build()  # as serve builds it
    s = heldout_pause
    sid = s.inputs[0].session_id
    engine.add_session(sid, seed=0)
    controls, said, loud = [], [], []
    for chunk in s.inputs:
        outs, errors = engine.step([chunk])
        assert not errors
        (o,) = outs
        controls.append(o.controls[0])
        said.append(o.text)
        loud.append(float(np.abs(o.audio.astype(np.float32)).mean()))
    tick = engine.tick_ms / 1000
    events = s.labels["events"]
    pauses = [e for e in events if e["type"] == "pause"]
    turns = [e for e in events if e["type"] == "turn_end"]
    assert pauses and turns
    timeline = "".join({"speak": "S", "silent": "."}.get(c, c[0].upper()) for c in controls)
    for e in pauses:  # from a tick after the user stops to the tick the user resumes: hold
        held = range(math.ceil(e["start"] / tick) + 1, math.floor(e["end"] / tick))
        assert all(controls[k] != "speak" for k in held), (e, timeline)
        assert all(loud[k] == 0.0 for k in held), (e, timeline)
    for e in turns:  # within 1.5 s of the end of the user's turn: a reply, with words
        reply = range(math.ceil(e["t"] / tick), min(len(controls), math.ceil((e["t"] + 1.5) / tick)))
        spoken = [k for k in reply if controls[k] == "speak"]
        assert len(spoken) >= 3, (e, timeline)
        assert "".join(said[k] for k in reply).strip(), (e, timeline, said)
