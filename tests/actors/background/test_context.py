"""A task's context rendered from a real session log: speech, typed text, the model's words, tools."""

import asyncio
import base64
import io
import json
import wave

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from actors.background.context import AsAudio, Transcripts, render
from actors.log.log_actor import SessionLogActor
from actors.log.session_log import SessionLog
from protocols import BackgroundTask, BackgroundUpdate, InputChunk, OutputChunk, ProtocolError, SessionEvent, ToolCall, ToolResult

SAMPLES = 3_200  # 200 ms ticks


class CountingTranscriber:
    """A test double: the 'transcript' names the audio's length, and every call is counted."""

    def __init__(self):
        self.calls = []

    async def transcribe(self, audio: np.ndarray) -> str:
        self.calls.append(audio.size)
        return f"<speech of {audio.size} samples>"


def speech(k: int) -> np.ndarray:
    return (3000 * np.sin(np.arange(SAMPLES) * (0.05 + 0.001 * k))).astype(np.int16)


def quiet() -> np.ndarray:
    return np.random.default_rng(0).integers(-50, 50, SAMPLES, dtype=np.int16)  # room noise, not speech


def conversation(sid: str) -> list:
    """12 s of a call: the user speaks (ticks 0-9), the model answers (12-19), the user types a
    question and asks for a response, the model calls a tool and delegates, results come back,
    the user speaks again (40-44)."""
    said = {12: "Sure, ", 13: "let ", 14: "me ", 15: "check ", 17: "that."}
    out = [SessionEvent(sid, 0.0, "session.joined", {"first_tick": 0})]
    for k in range(60):
        t = k * 0.2
        loud = k < 10 or 40 <= k < 45
        text = "What is 2 + 2?" if k == 25 else ""
        events = [{"type": "response.create"}, {"type": "input_audio_buffer.append"}] if k == 25 else []
        out.append(InputChunk(sid, k, t, speech(k) if loud else quiet(), text=text, events=events))
        out.append(OutputChunk(sid, k, t, np.zeros(SAMPLES, np.int16), text=said.get(k, ""), controls=["speak"] if k in said else ["silent"]))
        if k == 27:
            out.append(ToolCall(sid, t, "calculator", {"expression": "2 + 2"}, call_id="call_1"))
            out.append(ToolResult(sid, t + 0.1, "call_1", output={"value": 4}))
        if k == 30:
            out.append(BackgroundTask(sid, t, "delegate", "look up the weather", context_upto=10, task_id="task_old"))
            out.append(BackgroundUpdate(sid, t + 0.5, "task_old", "final", text="Sunny, 21 degrees.", contradicts=True))
    return out


@pytest.fixture(scope="module")
def log(ray_cluster, tmp_path_factory):
    handle = SessionLogActor.remote(str(tmp_path_factory.mktemp("log")), tick_ms=200, block_rows=32)
    yield handle
    ray_cluster.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
def sessions(ray_cluster, log):
    """Two sessions in one log: `a` with the conversation, `b` with a secret of its own."""
    ray = ray_cluster
    ta, tb = ray.get(log.open.remote("a")), ray.get(log.open.remote("b"))
    deltas = conversation("a")
    for i in range(0, len(deltas), 16):
        ray.get(log.append.remote(deltas[i : i + 16]))
    ray.get(log.append.remote([InputChunk("b", 0, 0.0, quiet(), text="my password is swordfish"), OutputChunk("b", 0, 0.0, np.zeros(SAMPLES, np.int16), text="noted, swordfish")]))
    last = ray.get(log.read.remote("a", ta, columns=["index"]))["index"][-1].as_py()
    return {"a": ta, "b": tb, "last": last}


def task(sid, token, upto, **kw):
    return BackgroundTask(sid, 12.0, "delegate", "answer the user's question", context_upto=upto, log_token=token, task_id="task_new", **kw)


def texts(messages):
    return [(m["role"], m.get("content")) for m in messages]


def test_the_whole_conversation_in_order(ray_cluster, log, sessions):
    stt = CountingTranscriber()
    messages = asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, speech=Transcripts(stt)))
    assert messages[0]["role"] == "system"
    body = texts(messages[1:])
    assert body[:4] == [
        ("user", "[event session.joined {\"first_tick\":0}]"),
        ("user", f"<speech of {10 * SAMPLES} samples>"),  # ticks 0-9: one run, transcribed whole
        ("assistant", "Sure, let me check that."),  # the model's ticks 12-17, one run
        ("user", "What is 2 + 2?\n[event response.create]"),  # typed text and the client's event
    ]
    call, result = messages[5], messages[6]
    assert call["tool_calls"][0]["id"] == "call_1" and call["tool_calls"][0]["function"]["name"] == "calculator"
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"expression": "2 + 2"}
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": '{"value": 4}'}
    delegated, update = messages[7], messages[8]
    assert json.loads(delegated["tool_calls"][0]["function"]["arguments"]) == {"instruction": "look up the weather"}
    assert update == {"role": "tool", "tool_call_id": "task_old", "content": "[final (contradicts what was said)] Sunny, 21 degrees."}
    assert body[8] == ("user", f"<speech of {5 * SAMPLES} samples>")  # ticks 40-44
    assert messages[-1]["role"] == "user" and "answer the user's question" in messages[-1]["content"]
    assert len(messages) == 11 and stt.calls == [10 * SAMPLES, 5 * SAMPLES]
    # A later task reads the same runs again: transcribed once, from then on from the cache.
    speech_port = Transcripts(stt)
    asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, speech=speech_port))
    asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, speech=speech_port))
    assert len(stt.calls) == 4


def test_only_what_the_task_saw(ray_cluster, log, sessions):
    # Up to index 40 (tick ~19): the first speech and the model's answer, nothing typed yet.
    messages = asyncio.run(render(task("a", sessions["a"], 40), log, speech=Transcripts(CountingTranscriber()), system=None))
    assert [m["role"] for m in messages] == ["user", "user", "assistant", "user"]
    assert "2 + 2" not in json.dumps(messages[:-1])
    # Nothing seen yet: only the task.
    assert asyncio.run(render(task("a", None, -1), log, system=None)) == [messages[-1]]


def test_another_sessions_context_is_never_visible(ray_cluster, log, sessions):
    stt = CountingTranscriber()
    mine = asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, speech=Transcripts(stt)))
    assert "swordfish" not in json.dumps(mine)
    for token in (sessions["b"], "x" * 32, None):  # b's token for a's log, a guess, none
        with pytest.raises(ProtocolError) as exc:
            asyncio.run(render(task("a", token, 5), log))
        assert exc.value.code == "forbidden"
    theirs = asyncio.run(render(task("b", sessions["b"], 1000), log, system=None))
    assert texts(theirs)[:2] == [("user", "my password is swordfish"), ("assistant", "noted, swordfish")]
    assert "Sunny" not in json.dumps(theirs) and stt.calls == [10 * SAMPLES, 5 * SAMPLES]


def test_the_cut_keeps_the_newest_whole_and_says_what_is_left_out(tmp_path):
    log = SessionLog(str(tmp_path), object_store=False)
    token = log.open("s")
    log.append([InputChunk("s", k, k * 0.2, quiet(), text=f"message number {k:03d}") for k in range(50)])
    messages = asyncio.run(render(task("s", token, 49), log, max_chars=400))
    system, note, kept, last = messages[0], messages[1], messages[2:-1], messages[-1]
    assert system["role"] == "system" and "answer the user's question" in last["content"]  # always kept
    assert kept[-1]["content"] == "message number 049" and all(m["content"].startswith("message number") for m in kept)
    numbers = [int(m["content"][-3:]) for m in kept]
    assert numbers == list(range(50 - len(kept), 50)) and sum(len(m["content"]) + 16 for m in kept) <= 400
    assert note == {"role": "user", "content": f"[{50 - len(kept)} earlier messages, from 0.0 s to {(49 - len(kept)) * 0.2:.1f} s, are left out]"}
    # A single message larger than the budget keeps its end.
    log.append([InputChunk("s", 50, 10.0, quiet(), text="x" * 1000 + "THE END")])
    cut = asyncio.run(render(task("s", token, 50), log, max_chars=100, system=None))
    assert cut[1]["content"].endswith("THE END") and len(cut[1]["content"]) == 84


def test_speech_as_audio_for_an_audio_model(ray_cluster, log, sessions):
    messages = asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, speech=AsAudio(), system=None))
    parts = [m["content"][0] for m in messages if isinstance(m["content"], list)]
    assert [p["type"] for p in parts] == ["input_audio", "input_audio"]
    with wave.open(io.BytesIO(base64.b64decode(parts[0]["input_audio"]["data"]))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (16000, 1, 10 * SAMPLES)
        assert np.array_equal(np.frombuffer(w.readframes(SAMPLES), np.int16), speech(0))


def test_without_a_speech_option_speech_is_noted_not_dropped(ray_cluster, log, sessions):
    messages = asyncio.run(render(task("a", sessions["a"], sessions["last"]), log, system=None))
    assert messages[1]["content"] == "[the user spoke for 2.0 s; no speech recognition is configured]"


def test_the_log_token_never_enters_the_log(tmp_path):
    log = SessionLog(str(tmp_path), object_store=False)
    token = log.open("s")
    t = task("s", token, -1)
    assert token not in repr(t)
    log.append([t])
    (row,) = log.read("s", token).to_pylist()
    assert token not in json.dumps(row) and "log_token" not in row["payload"]
    with pytest.raises(ProtocolError, match="log_token"):
        BackgroundTask("s", 0.0, "delegate", "x", context_upto=0, log_token=123)


def test_loudness_is_read_per_row_from_sliced_columns():
    import pyarrow as pa

    from actors.background.context import _rms

    rows = [speech(0).tobytes(), quiet().tobytes(), None, (speech(1) // 10).tobytes(), speech(2).tobytes()]
    column = pa.chunked_array([pa.array(rows, pa.binary()).slice(1, 3), pa.array(rows, pa.binary()).slice(3, 2)])
    want = [np.sqrt(np.mean(np.frombuffer(r, np.int16)[::4].astype(np.float64) ** 2)) if r else 0.0 for r in rows[1:4] + rows[3:5]]
    assert np.allclose(_rms(column), want, rtol=1e-3)


class SpyLog:
    """The session log as `render` reads it, keeping what each read asked for and got back."""

    def __init__(self, log):
        self.log, self.reads = log, []

    async def refs(self, *args, **kwargs):
        parts = await self.log.refs(*args, **kwargs)
        self.reads.append((args, kwargs, [p for _, _, p in parts]))
        return parts


def test_a_long_session_is_read_only_for_its_window(tmp_path):
    # Two minutes of a call, a video frame every tick, nearly all of it in Parquet by the end.
    log = SessionLog(str(tmp_path), tick_ms=200, retention_s=5.0, segment_s=2.0, object_store=False)
    token = log.open("s")
    frame = np.full((40, 40, 3), 7, np.uint8)
    for k0 in range(0, 600, 50):
        log.append([d for k in range(k0, k0 + 50) for d in (
            InputChunk("s", k, k * 0.2, speech(k) if k % 50 < 5 else quiet(), frame=frame, text=f"typed at {k}" if k % 100 == 60 else ""),
            OutputChunk("s", k, k * 0.2, np.zeros(SAMPLES, np.int16), text=f"said at {k}" if k % 50 == 20 else ""),
        )])
    assert log.stats()["memory_rows"] < 1200 - 1000
    spy, stt = SpyLog(log), CountingTranscriber()
    t = BackgroundTask("s", 500.0, "delegate", "answer", context_upto=1199, log_token=token, task_id="w")
    messages = asyncio.run(render(t, spy, speech=Transcripts(stt), context_s=29.9, system=None))

    # The last 29.9 s before the last row the task saw (ticks 450-599) and nothing older: three runs of speech, two typed lines, three replies.
    assert messages[0] == {"role": "user", "content": "[the conversation before 90.0 s is left out]"}
    body = json.dumps(messages)
    assert stt.calls == [5 * SAMPLES] * 3
    assert [k for k in range(0, 600, 10) if f"typed at {k}\"" in body] == [460, 560]
    assert [k for k in range(0, 600, 10) if f"said at {k}\"" in body] == [470, 520, 570]
    # What was fetched: two reads of the window; audio only of the input chunks, frames never.
    (rows_args, rows_options, rows_parts), (audio_args, audio_options, audio_parts) = spy.reads
    rows = pa.concat_tables(rows_parts)
    assert "audio" not in rows.column_names and "frame" not in rows.column_names
    assert rows["index"].to_pylist() == list(range(900, 1200)) and pc.min(rows["t"]).as_py() >= 89.9
    audio = pa.concat_tables(audio_parts)
    assert audio_options["kinds"] == ["input_chunk"] and audio.column_names == ["session_id", "index", "audio"]
    assert audio["index"].to_pylist() == list(range(900, 1200, 2))
    assert audio.nbytes < 150 * (2 * SAMPLES + 64)  # the user's 150 chunks of audio and little else

    # A row bound as well: at most max_rows back, whatever the seconds.
    spy.reads.clear()
    asyncio.run(render(t, spy, speech=Transcripts(stt), context_s=None, max_rows=40, system=None))
    assert [pa.concat_tables(parts)["index"].to_pylist() for _, _, parts in spy.reads] == [list(range(1160, 1200)), list(range(1160, 1200, 2))]
