"""MoshiEngine against the `moshi` package stepping each session alone: sessions join and leave
rows of one batch at different ticks and every session gets the text tokens and audio codes the
package's `LMGen` + `MimiModel` give it alone (greedy, so exactly), and the same audio to float
rounding (at most 2 LSB of int16)."""

import json

import numpy as np
import pytest
import torch

from models.moshi.engine import UNGENERATED, MoshiEngine
from models.moshi.resample import Resampler
from protocols.chunks import InputChunk, ProtocolError

from .conftest import chunk, voice


@pytest.fixture(scope="module")
def engine(moshi_dir):
    return MoshiEngine(moshi_dir, max_sessions=3, temperature=0.0, temperature_text=0.0)  # greedy, as the reference


def reference(moshi_dir, audio: np.ndarray) -> tuple[list, np.ndarray]:
    """The package alone, as its own server steps it: 16 kHz in, one Mimi frame at a time.
    -> per frame the tokens (1 + dep_q,) or None while LMGen has none yet, and 16 kHz out."""
    from moshi.models import LMGen
    from moshi.models.loaders import CheckpointInfo

    cfg = json.loads((moshi_dir / "config.json").read_text())
    lm_cfg = {k: v for k, v in cfg.items() if not k.endswith("_name") and k != "model_type"}
    info = CheckpointInfo(moshi_dir / cfg["moshi_name"], moshi_dir / cfg["mimi_name"], moshi_dir / cfg["tokenizer_name"],
                          lm_cfg, cfg, json.loads((moshi_dir / cfg["mimi_config_name"]).read_text()))
    lm, mimi = info.get_moshi("cpu", torch.float32), info.get_mimi("cpu")
    up, down = Resampler(3, 2), Resampler(2, 3)
    x24, _ = up(torch.from_numpy(audio).float()[None] / 32768, up.init_state(1))
    gen = LMGen(lm, use_sampling=False)
    tokens, pcm = [], []
    with torch.no_grad(), mimi.streaming(1), gen.streaming(1):
        for f in range(x24.shape[1] // 1920):
            out = gen.step(mimi.encode(x24[None, :, f * 1920:(f + 1) * 1920]))
            tokens.append(None if out is None else out[0, :, 0].numpy())
            pcm.append(torch.zeros(1920) if out is None else mimi.decode(out[:, 1:])[0, 0])
        y16, _ = down(torch.cat(pcm)[None], down.init_state(1))
    return tokens, (y16[0].clamp(-1, 1) * 32767).round().to(torch.int16).numpy()


def test_batched_sessions_joining_and_leaving_match_the_package_alone(engine, moshi_dir):
    # tick: who joins (+) / leaves (-); c takes the row a left; b misses tick 4 (stepped as silence).
    plan = {0: ["+a"], 2: ["+b"], 5: ["-a", "+c"], 6: ["+d"]}
    seeds = {"a": 1, "b": 2, "c": 3, "d": 4}
    inputs = {s: [] for s in seeds}
    got = {s: ([], []) for s in seeds}
    for k in range(16):
        for op in plan.get(k, []):
            (engine.add_session if op[0] == "+" else engine.remove_session)(op[1:])
        chunks = [chunk(s, seeds[s], k) for s in engine.sessions if not (s == "b" and k == 4)]
        outs, errors = engine.step(chunks)
        assert set(errors) == ({"b"} if k == 4 else set())
        for s in engine.sessions:
            inputs[s].append(np.zeros(1280, np.int16) if (s == "b" and k == 4) else voice(seeds[s], k))
            got[s][0].append(engine.last_tokens[s][:, 0])
        for o in outs:
            got[o.session_id][1].append(o.audio)
        if k == 4:  # the session stepped as missing has its output too, after the good ones
            assert [o.session_id for o in outs][-1] == "b"
    for s in seeds:
        ref_tokens, ref_audio = reference(moshi_dir, np.concatenate(inputs[s]))
        mine = got[s][0]
        assert len(mine) == len(ref_tokens) >= 4
        for f, (m, r) in enumerate(zip(mine, ref_tokens)):
            if r is None:
                assert (m == UNGENERATED).all(), (s, f)
            else:
                assert np.array_equal(m, r), (s, f, m, r)
        audio = np.concatenate(got[s][1]).astype(np.int32)
        assert np.abs(audio - ref_audio).max() <= 2, s
        assert np.abs(ref_audio).max() > 1000  # it said something, so the comparison has teeth
    # Sessions with different input got different codes: a row mix-up would show.
    n = min(len(got["a"][0]), len(got["b"][0]))
    assert not np.array_equal(np.stack(got["a"][0][1:n]), np.stack(got["b"][0][1:n]))


def test_bad_chunks_are_reported_per_session_and_stepped_as_missing(engine):
    for s in list(engine.sessions):
        engine.remove_session(s)
    engine.add_session("x")
    engine.add_session("y")
    good = chunk("y", 1, 0)
    short = InputChunk("x", 0, 0.0, np.zeros(1000, np.int16))  # not one 80 ms tick
    outs, errors = engine.step([short, good, "junk"])
    assert errors["x"].code == "invalid_audio" and "1280 samples" in str(errors["x"])
    assert any(isinstance(e, ProtocolError) and e.code == "invalid_value" for k, e in errors.items() if k not in ("x", "y"))
    assert [o.session_id for o in outs] == ["y", "x"] and outs[1].seq == 0 and all(o.audio.shape == (1280,) for o in outs)
    _, errors = engine.step([chunk("y", 1, 0)])  # seq does not move forward
    assert errors["y"].code == "out_of_order"
    with pytest.raises(ProtocolError) as e:
        for s in ("z1", "z2"):
            engine.add_session(s)
    assert e.value.code == "capacity"
    for s in list(engine.sessions):
        engine.remove_session(s)
