"""The synthetic dialogue generator: deterministic, labels that agree with its audio, every
scenario present, and logs that round-trip through the log's schema."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from protocols.chunks import CONTROLS, InputChunk, OutputChunk
from protocols.deltas import SCHEMA, from_table, to_batch
from training import data
from training.dialogues import generate
from training.generate import generate_set, plan
from training.scenarios import SCENARIOS
from training.script import DialogueConfig
from training.voices import HELDOUT_VARIANTS, MODEL_VOICE, Synth, VoicePool


@pytest.fixture(scope="module")
def dialogues(synth):
    return {s: generate(i, s, synth=synth) for i, s in enumerate(SCENARIOS)}


def test_deterministic_for_a_seed(synth):
    a = generate(7, "interruption", synth=synth)
    b = generate(7, "interruption", synth=Synth(None))  # rendered afresh, not from the cache
    assert np.array_equal(a.user_audio, b.user_audio) and np.array_equal(a.model_audio, b.model_audio)
    assert a.controls == b.controls and a.text == b.text and a.labels == b.labels
    assert a.table().equals(b.table())
    c = generate(8, "interruption", synth=synth)
    assert not np.array_equal(a.user_audio[: len(c.user_audio)], c.user_audio[: len(a.user_audio)])


def test_every_scenario_carries_its_event(dialogues):
    want = {"turn_end": "turn_end", "pause": "pause", "interruption": "interruption", "backchannel": "backchannel",
            "timer": "timer", "counting": "count", "typed": "typed", "update": "update"}
    for scenario, d in dialogues.items():
        kinds = {e["type"] for e in d.labels["events"]}
        assert want[scenario] in kinds, (scenario, kinds)
        assert d.labels["scenario"] == scenario
        assert 10.0 - 1e-6 <= d.labels["duration_s"] <= 40.0
    assert dialogues["counting"].frames and all(f.shape == (160, 160, 3) for f in dialogues["counting"].frames.values())
    assert dialogues["typed"].typed and dialogues["update"].updates


def test_targets_follow_the_behaviour_rules(dialogues):
    tick = DialogueConfig().tick_s
    for d in dialogues.values():
        assert set(d.controls) <= set(CONTROLS)
        assert all(len(t.encode()) <= d.cfg.text_out for t in d.text)
        said = [k for k, c in enumerate(d.controls) if c in ("speak", "yield")]
        assert all(d.text[k] == "" for k in range(d.n_ticks) if k not in said)
        for e in d.labels["events"]:
            if e["type"] == "turn_end":  # a reply starts 0.2-0.4 s after the user stops, never before
                assert 0.15 <= e["reply_t"] - e["t"] <= 0.45 + 0.05, e
                assert d.controls[e["reply_tick"]] in ("speak", "yield") and d.controls[e["reply_tick"] - 1] in ("silent", "delegate")
            if e["type"] == "pause":  # silent through a thinking pause
                ticks = range(int(e["start"] / tick), int(e["end"] / tick))
                assert all(d.controls[k] == "silent" for k in ticks)
            if e["type"] == "interruption":  # stops on the first boundary after 50 ms of the user's speech
                assert d.controls[e["stop_tick"]] == "yield" and d.controls[e["stop_tick"] + 1] == "silent"
                assert d.cfg.stop_after_s - 1e-6 <= e["stop_t"] - e["t"] < d.cfg.stop_after_s + tick
            if e["type"] == "backchannel":
                k = int(e["end"] / tick) + 2
                assert d.controls[k] == "speak"
            if e["type"] == "timer":
                assert abs(e["speak_t"] - e["target_t"]) <= tick
    turn = dialogues["turn_end"]
    assert "".join(turn.text) == "".join(m["text"] for m in turn.labels["model_turns"])


def _speech_segments(audio: np.ndarray, model) -> list[tuple[float, float]]:
    from silero_vad import get_speech_timestamps

    wav = torch.from_numpy(audio.astype(np.float32) / 32768)
    return [(s["start"], s["end"]) for s in get_speech_timestamps(wav, model, sampling_rate=16_000, return_seconds=True)]


def test_labels_agree_with_silero_vad_on_the_user_channel(dialogues):
    silero_vad = pytest.importorskip("silero_vad")
    torch.set_num_threads(1)
    vad = silero_vad.load_silero_vad()  # from the package, never a hub
    tol = 0.25
    for scenario in ("pause", "interruption", "backchannel", "typed"):
        d = dialogues[scenario]
        found = _speech_segments(d.user_audio, vad)
        for a, b in d.labels["user_speech"]:
            hit = [(s, e) for s, e in found if e > a and s < b]
            assert hit, (scenario, a, b, found)
            assert abs(min(s for s, _ in hit) - a) <= tol and abs(max(e for _, e in hit) - b) <= tol, (scenario, a, b, hit)
        spans = d.labels["user_speech"]
        assert all(any(e > a and s < b for a, b in spans) for s, e in found), (scenario, found, spans)
        model = _speech_segments(d.model_audio, vad)  # the model's channel too
        assert all(any(e > a - tol and s < b + tol for a, b in d.labels["model_speech"]) for s, e in model)


def test_log_round_trips_through_the_schema(dialogues, tmp_path):
    d = dialogues["update"]
    path = data.save(d, tmp_path)
    table = pq.read_table(path)
    assert table.schema.equals(SCHEMA)
    deltas = from_table(table)
    assert pa.Table.from_batches([to_batch(deltas, first_index=0)]).equals(d.table())  # lossless
    inputs = [x for x in deltas if isinstance(x, InputChunk)]
    assert np.array_equal(np.concatenate([c.audio for c in inputs]), d.user_audio)
    assert {type(x).__name__ for x in deltas} == {"InputChunk", "OutputChunk", "BackgroundTask", "BackgroundUpdate"}
    assert json.loads(path.with_suffix(".json").read_text()) == d.labels

    s = data.read(path)
    assert s.n_ticks == d.n_ticks and [o.controls[0] for o in s.outputs] == d.controls
    assert np.array_equal(s.model_channel(), d.model_audio)
    (k, _, text), = d.updates
    assert s.updates == {k: [text]}
    t = data.targets(s, d.cfg.text_out)
    assert t["ctrl"].tolist() == [CONTROLS.index(c) for c in d.controls]
    assert t["mel"].shape == (d.n_ticks, 8, 80)
    assert all(bytes(b for b in row if b < 256).decode() == said for row, said in zip(t["text"].tolist(), d.text))


def test_video_log_keeps_its_frames(dialogues, tmp_path):
    d = dialogues["counting"]
    deltas = from_table(pq.read_table(data.save(d, tmp_path)))
    frames = {x.seq: x.frame for x in deltas if isinstance(x, InputChunk) and x.frame is not None}
    assert frames.keys() == d.frames.keys() and all(np.array_equal(frames[k], d.frames[k]) for k in frames)
    assert all(isinstance(x, OutputChunk) or isinstance(x, InputChunk) for x in deltas)


def test_heldout_uses_unseen_voices_and_seeds():
    train, held = VoicePool("train"), VoicePool("heldout")
    assert not set(train.timbres) & set(held.timbres)
    assert all(v in HELDOUT_VARIANTS for _, v in held.timbres)
    assert (MODEL_VOICE.base, MODEL_VOICE.variant) not in set(train.timbres) | set(held.timbres)
    jobs = plan(16, 8)
    assert not {s for sp, s, _ in jobs if sp == "train"} & {s for sp, s, _ in jobs if sp == "heldout"}
    assert {sc for sp, _, sc in jobs if sp == "train"} == set(SCENARIOS) == {sc for sp, _, sc in jobs if sp == "heldout"}


def test_generate_set_writes_both_splits(tmp_path, synth):
    m = generate_set(tmp_path, 2, 1, cache_dir=synth.cache_dir.parent, workers=0, progress=None)
    assert len(m["splits"]["train"]) == 2 and len(m["splits"]["heldout"]) == 1
    for rel in m["splits"]["train"] + m["splits"]["heldout"]:
        assert (tmp_path / rel).exists() and (tmp_path / rel).with_suffix(".json").exists()
    held = json.loads((tmp_path / m["splits"]["heldout"][0]).with_suffix(".json").read_text())
    assert held["split"] == "heldout" and held["user_voice"]["variant"] in HELDOUT_VARIANTS
