"""A background task's context: the recent conversation up to what the task saw, as chat messages.

`await render(task, log, speech=...)` reads the task's session log (`SessionLog.refs` with the
task's `log_token`; only the task's own session: the log checks the token) and returns OpenAI chat
messages. The read is bounded: only rows up to `task.context_upto`, of the last `context_s`
seconds before it (at most `max_rows` rows), and only the columns rendering uses: text,
payloads and times of every row, and the audio of the user's input chunks alone (their loudness
finds the runs of speech, whatever the speech option). The model's own audio and video frames are
never read. Older conversation is left out with a note saying so. From the rows:

- the user's speech: runs of input chunks louder than `SPEECH_RMS`, ending after `END_S` of
  quiet, each one user message (see "Speech" below);
- the user's typed text, and client and session events (`[event <type> <data>]`, a user message);
- what the model said: its output text, one assistant message per run of speech;
- earlier background tasks and tool calls as assistant `tool_calls`, their updates and results
  as `tool` messages (`tool_call_id` = the task or call id);
- last, the task itself as a user message (its kind, tool, instruction and arguments).

Messages are in the order their first row was logged. A system message leads (`system=None`
leaves it out); a note follows it when rows before the window exist.

Bounded, newest kept: messages are counted in characters (an audio part as `AUDIO_CHARS_PER_S`
per second). The system message and the task always stay; of the conversation, the newest
messages that fit `max_chars` are kept whole and everything older is replaced by one user
message saying how many messages over which seconds were left out. A newest message larger than
the budget on its own is cut to its last `max_chars` characters.

Speech. The default is `Transcripts(transcriber)`: each run of the user's speech goes through a
speech-recognition model (`actors.background.transcribe`: Whisper served by vLLM, the same way as the pool)
and reaches a text-only background model as its transcript. Why the default: any text model
(and vLLM's tool parsers and structured output, which are most complete for text models) can
then be the pool's model; a run is transcribed once and its text cached, so a later task pays
only for speech since the last one, while an audio model re-encodes all of the conversation's
audio for every task; and Whisper's cost is small next to the pool's model. The other option
is `AsAudio()`: each run as an `input_audio` part (base64 WAV, 16 kHz mono) for an audio-capable
model served by vLLM (Qwen2-Audio, Ultravox, Qwen2.5-Omni), which hears tone and hesitation a
transcript loses; point the pool at such a model and pass `speech=AsAudio()`. With `speech=None`
a run is only noted (its length), never silently dropped, and a warning is logged.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protocols import BackgroundTask, ProtocolError
from protocols.chunks import SAMPLE_RATE

from actors.log.log_reads import fetch
from actors.background.transcribe import Transcriber, wav_bytes

log = logging.getLogger("interplay.context")

SPEECH_RMS = 300.0  # int16 RMS above which a chunk counts as speech (about -40 dBFS)
END_S = 0.6  # this much quiet ends a run of speech (the user's or the model's)
MAX_CHARS = 32_000  # about 8k tokens
CONTEXT_S = 300.0  # how far back a task's context reaches: longer than MAX_CHARS holds of talk
MAX_ROWS = 20_000  # and at most this many rows back (a 300 s window is about 3,000 chunk rows)
_COLUMNS = ["index", "session_id", "t", "kind", "text", "payload"]  # what rendering reads of every row
_AUDIO = ["index", "session_id", "audio"]  # and of the user's input chunks
AUDIO_CHARS_PER_S = 100  # an audio part's cost in the budget (about 25 audio tokens a second)
SYSTEM = (
    "You work in the background for a live voice assistant that keeps talking with the user. "
    "Below is the conversation so far (the user's speech as transcripts, typed text, what the "
    "assistant said, earlier tool calls and results), then your task. Answer briefly; the "
    "assistant will weave your answer into the conversation."
)
_QUIET_EVENTS = ("input_audio_buffer.", "interplay.tick")  # per-tick client events: no content


# --- speech ---------------------------------------------------------------------------------------


class Transcripts:
    """User speech as text from a `Transcriber`; each run's text is cached (LRU, `cache` runs)."""

    def __init__(self, transcriber: Transcriber, cache: int = 1024):
        self.transcriber = transcriber
        self.cache: OrderedDict[tuple, str] = OrderedDict()
        self.size = cache

    async def content(self, key: tuple, samples) -> str | list:
        """The run's text; `key` (session, first and last index) names the run, `samples()` its audio."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        text = (await self.transcriber.transcribe(samples())).strip()
        self.cache[key] = text
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return text


class AsAudio:
    """User speech as `input_audio` parts, for an audio-capable background model."""

    async def content(self, key: tuple, samples) -> str | list:
        data = base64.b64encode(wav_bytes(samples())).decode()
        return [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]


# --- reading the log --------------------------------------------------------------------------------


async def _call(log_port: Any, method: str, *args, **kwargs):
    """A log method through whatever `log` is: a Ray actor handle, an async port, or the plain class."""
    fn = getattr(log_port, method)
    if hasattr(fn, "remote"):
        from actors.remote import call_remote

        return await call_remote(fn, *args, **kwargs)
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


async def read(task: BackgroundTask, log_port: Any, *, context_s: float | None = CONTEXT_S, max_rows: int = MAX_ROWS) -> tuple[pa.Table, pa.Table]:
    """The task's window of its session, with the task's token: (rows, audio). `rows` holds
    `_COLUMNS` of every row up to task.context_upto, at most `max_rows` back, with t no more than
    `context_s` before that last row's (None: any); `audio` the `_AUDIO` columns of the input
    chunks among them, in the same order."""
    end = task.context_upto + 1
    if end <= 0:
        return _empty(_COLUMNS), _empty(_AUDIO)
    if not task.log_token:
        raise ProtocolError(f"task {task.task_id} carries no log token: its context cannot be read", "forbidden", "log_token")
    start = max(0, end - max_rows)
    rows = await _fetch(task, log_port, start, end, columns=_COLUMNS, last_s=context_s)
    audio = await _fetch(task, log_port, start, end, columns=_AUDIO, kinds=["input_chunk"], last_s=context_s)
    return rows, audio


async def _fetch(task: BackgroundTask, log_port: Any, start: int, end: int, **options) -> pa.Table:
    from ray.exceptions import ObjectLostError, OwnerDiedError

    attempt = 0
    while True:
        parts = await _call(log_port, "refs", task.session_id, task.log_token, start, end, **options)
        try:
            table = await fetch(parts, start, end, options["columns"])
            break
        except (OwnerDiedError, ObjectLostError):  # the log restarted between refs and fetch: ask again
            attempt += 1
            if attempt == 3:
                raise
    if table.num_rows and pc.any(pc.not_equal(table["session_id"], task.session_id)).as_py():  # pyright: ignore[reportAttributeAccessIssue] (pyarrow makes its compute functions at import time)
        raise ProtocolError("the log returned rows of another session", "forbidden", "session_id")
    return table


def _empty(columns: list[str]) -> pa.Table:
    from protocols.deltas import SCHEMA

    return pa.schema([SCHEMA.field(c) for c in columns]).empty_table()


# --- rendering --------------------------------------------------------------------------------------


@dataclass
class _Item:
    first: int  # log index of the item's first row: the order of the conversation
    t0: float
    t1: float
    message: dict
    cost: int


def _cost(message: dict) -> int:
    content = message.get("content")
    n = 0
    if isinstance(content, str):
        n += len(content)
    elif isinstance(content, list):
        for part in content:
            if part.get("type") == "input_audio":
                n += int(AUDIO_CHARS_PER_S * len(part["input_audio"]["data"]) * 3 / 4 / (2 * SAMPLE_RATE))
            else:
                n += len(part.get("text", ""))
    for call in message.get("tool_calls") or ():
        n += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return n + 16  # role and framing


def _runs(loud: list[bool], ts: list[float], gap_s: float) -> list[tuple[int, int]]:
    """(first, last) positions of runs of True, a run ending after more than gap_s without one."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    last = 0  # read only once a run started
    for i, on in enumerate(loud):
        if not on:
            continue
        if start is not None and ts[i] - ts[last] > gap_s:
            runs.append((start, last))
            start = None
        if start is None:
            start = i
        last = i
    if start is not None:
        runs.append((start, last))
    return runs


def _event_line(etype: str, data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")) if data else ""
    return f"[event {etype}{' ' + text[:300] if text else ''}]"


def _task_message(row: dict, payload: dict) -> dict:
    args = {"instruction": row["text"] or payload.get("instruction", ""), **(payload.get("arguments") or {})}
    name = payload.get("tool") or payload.get("kind") or "delegate"
    return {"role": "assistant", "content": None, "tool_calls": [{"id": payload["task_id"], "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]}


async def conversation(table: pa.Table, audio: pa.Table, speech: Any = None) -> list[_Item]:
    """The conversation in `table` (one session's rows, index order) as items in logged order;
    `audio` holds the audio of its input chunks, in the same order."""
    items: list[_Item] = []
    kinds = table["kind"].to_pylist()
    index, ts, texts, payloads = (table[c].to_pylist() for c in ("index", "t", "text", "payload"))
    sid = table["session_id"][0].as_py() if table.num_rows else None

    # The user's speech: loud input chunks, in runs (positions in `ins` are rows of `audio`).
    ins = [i for i, k in enumerate(kinds) if k == "input_chunk"]
    if [index[i] for i in ins] != audio["index"].to_pylist():
        raise ValueError("the audio read does not match the input chunks read")
    if ins:
        sound = audio["audio"]
        rms = _rms(sound)
        loud = list(rms > SPEECH_RMS)
        t_in = [ts[i] for i in ins]
        tick_s = _tick_s(sound, 0)
        pending = []
        for a, b in _runs(loud, t_in, END_S):
            samples = lambda a=a, b=b: np.concatenate([np.frombuffer(sound[j].as_buffer(), "<i2") for j in range(a, b + 1)]).astype(np.int16)
            pending.append((ins[a], t_in[a], t_in[b] + tick_s, (sid, index[ins[a]], index[ins[b]]), samples))
        contents = await asyncio.gather(*(_speech(speech, key, samples) for _, _, _, key, samples in pending))
        for (pos, t0, t1, _, _), content in zip(pending, contents):
            msg = {"role": "user", "content": content}
            items.append(_Item(index[pos], t0, t1, msg, _cost(msg)))

    # What the model said: output text, in runs.
    outs = [i for i, k in enumerate(kinds) if k == "output_chunk"]
    if outs:
        said = [bool(texts[i]) for i in outs]
        t_out = [ts[i] for i in outs]
        for a, b in _runs(said, t_out, END_S):
            text = "".join(texts[outs[j]] or "" for j in range(a, b + 1)).strip()
            if text:
                msg = {"role": "assistant", "content": text}
                items.append(_Item(index[outs[a]], t_out[a], t_out[b], msg, _cost(msg)))

    # Everything else, one item per row (typed text and client events of input chunks too).
    for i, kind in enumerate(kinds):
        if kind == "output_chunk" or (kind == "input_chunk" and not texts[i] and '"events": []' in payloads[i]):
            continue  # nothing here beyond audio and words handled above
        row = {"text": texts[i]}
        payload = json.loads(payloads[i] or "{}")
        lines, msg = [], None
        if kind == "input_chunk":
            if row["text"]:
                lines.append(row["text"])
            lines += [_event_line(e.get("type", "?"), {k: v for k, v in e.items() if k != "type"}) for e in payload.get("events", []) if not str(e.get("type", "")).startswith(_QUIET_EVENTS)]
        elif kind == "session_event":
            lines.append(_event_line(payload.get("type", "?"), payload.get("data")))
        elif kind == "background_task":
            msg = _task_message(row, payload)
        elif kind == "tool_call":
            msg = {"role": "assistant", "content": None, "tool_calls": [{"id": payload["call_id"], "type": "function", "function": {"name": payload["name"], "arguments": json.dumps(payload.get("arguments", {}), ensure_ascii=False)}}]}
        elif kind == "tool_result":
            body = f"error: {payload['error']}" if payload.get("error") else json.dumps(payload.get("output"), ensure_ascii=False)
            msg = {"role": "tool", "tool_call_id": payload["call_id"], "content": body}
        elif kind == "background_update":
            mark = " (contradicts what was said)" if payload.get("contradicts") else ""
            body = f"[{payload.get('status')}{mark}] {row['text'] or ''}".strip()
            if payload.get("data") is not None:
                body += " " + json.dumps(payload["data"], ensure_ascii=False)
            msg = {"role": "tool", "tool_call_id": payload["task_id"], "content": body}
        if lines:
            msg = {"role": "user", "content": "\n".join(lines)}
        if msg is not None:
            items.append(_Item(index[i], ts[i], ts[i], msg, _cost(msg)))
    items.sort(key=lambda it: it.first)
    return items


async def _speech(speech: Any, key: tuple, samples) -> str | list:
    """One run of the user's speech as message content; `samples()` builds its audio when needed."""
    if speech is None:
        log.warning("session %r: user speech without a speech option; only its length reaches the background model", key[0])
        return f"[the user spoke for {samples().size / SAMPLE_RATE:.1f} s; no speech recognition is configured]"
    return await speech.content(key, samples)


def _rms(audio: pa.ChunkedArray) -> np.ndarray:
    """Each row's int16 RMS (every 4th sample; 0 for no audio), read from each chunk's one data
    buffer: no per-row objects, no copy."""
    out = []
    for chunk in audio.chunks:
        n = len(chunk)
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + n + 1] // 8
        data = chunk.buffers()[2]
        samples = np.frombuffer(data, "<i2")[::4][: offsets[-1]] if data is not None and data.size else np.zeros(0, np.int16)
        starts, lengths = offsets[:-1], np.diff(offsets)
        squares = samples.astype(np.float32) ** 2
        if squares.size:
            sums = np.add.reduceat(squares, np.minimum(starts, squares.size - 1))
            out.append(np.sqrt(np.where(lengths > 0, sums / np.maximum(lengths, 1), 0.0)))
        else:
            out.append(np.zeros(n))
    return np.concatenate(out) if out else np.zeros(0)


def _tick_s(audio: pa.ChunkedArray, row: int) -> float:
    """The length of the chunk at `row`, in seconds (every chunk of a session is one tick)."""
    return len(audio[row].as_buffer()) / 2 / SAMPLE_RATE


def bound(items: list[_Item], max_chars: int) -> list[dict]:
    """The newest items that fit `max_chars`, whole; older ones replaced by one note."""
    kept, used = [], 0
    for it in reversed(items):
        if used + it.cost > max_chars:
            break
        kept.append(it)
        used += it.cost
    kept.reverse()
    if not kept and items:  # the newest alone is too large: keep its end
        newest = items[-1]
        msg = dict(newest.message)
        if isinstance(msg.get("content"), str):
            msg["content"] = msg["content"][-max(max_chars - 16, 0) :]
        kept = [_Item(newest.first, newest.t0, newest.t1, msg, _cost(msg))]
    left = items[: len(items) - len(kept)]
    out = [it.message for it in kept]
    if left:
        note = f"[{len(left)} earlier messages, from {left[0].t0:.1f} s to {left[-1].t1:.1f} s, are left out]"
        out.insert(0, {"role": "user", "content": note})
    return out


def task_message(task: BackgroundTask) -> dict:
    what = f"tool {task.tool}" if task.tool else task.kind
    lines = [f"Your task ({what}, id {task.task_id}): {task.instruction or '(no instruction: help with the conversation above)'}"]
    if task.arguments:
        lines.append("Arguments: " + json.dumps(task.arguments, ensure_ascii=False))
    if task.supersedes:
        lines.append(f"It replaces the earlier task {task.supersedes}.")
    return {"role": "user", "content": "\n".join(lines)}


async def render(task: BackgroundTask, log: Any, *, speech: Any = None, max_chars: int = MAX_CHARS, system: str | None = SYSTEM,
                 context_s: float | None = CONTEXT_S, max_rows: int = MAX_ROWS) -> list[dict]:
    """The task's conversation up to `task.context_upto`, its last `context_s` seconds (None: all)
    and at most `max_rows` rows, as chat messages (see the module).

    `log` is the session log: a `SessionLogActor` handle, a `Remote` of it, or a `SessionLog`.
    `speech` is `Transcripts(transcriber)` (default in the pool), `AsAudio()`, or None.
    ProtocolError("forbidden") if the task's token does not open its session's log.
    """
    if not isinstance(max_chars, int) or max_chars <= 0:
        raise ValueError("max_chars must be a positive number of characters")
    if context_s is not None and not context_s > 0:
        raise ValueError("context_s must be a positive number of seconds, or None for all of the session")
    if not isinstance(max_rows, int) or max_rows <= 0:
        raise ValueError("max_rows must be a positive number of rows")
    messages = [{"role": "system", "content": system}] if system else []
    if log is None:
        return messages + [task_message(task)]
    rows, audio = await read(task, log, context_s=context_s, max_rows=max_rows)
    if rows.num_rows and rows["index"][0].as_py() > 0:  # a session's rows start at 0: older ones exist
        messages.append({"role": "user", "content": f"[the conversation before {rows['t'][0].as_py():.1f} s is left out]"})
    items = await conversation(rows, audio, speech)
    return messages + bound(items, max_chars) + [task_message(task)]

