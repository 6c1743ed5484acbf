"""The shipped checkpoint: the default of `interplay serve`, it loads, streams, and takes the turn
after a question but not in a pause."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from models.config import InteractionConfig
from training import data
from training.dialogues import generate
from training.generate import HELDOUT_SEED0
from training.script import DialogueConfig
from training.voices import Synth

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny"
CFG = InteractionConfig.preset("tiny")


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
