"""`RealtimeSession`: one Realtime session's protocol state; no transport, no clock, no timers.

Client events come in (`receive` a raw message, or `handle` a parsed one) and the model's
`OutputChunk`s come in (`deliver`); server events and model audio go out through the `Sink` the
session is given (its transport), and `next_input(seq, t_start)` says what goes into the session's
next `InputChunk`: typed user text, the client events to forward (and the typed requests they make
of the interaction side, `protocols.requests`), and `forced`, the control the
client's requests hold (`response.create`: "speak" from the next chunk on, until an output of
those chunks shows "yield" or `force_s` of them have passed; `response.cancel`: "silent" for one
chunk). Times are passed in; nothing here sleeps or schedules.

Output events, per speaking run (consecutive speaking chunks, see `is_speaking`):
  run starts  -> response.created, response.output_item.added, conversation.item.added,
                 then the sink's playout start (WebRTC: output_audio_buffer.started)
  each chunk  -> the sink's audio (WebSocket: response.output_audio.delta),
                 response.output_audio_transcript.delta (when it carries text)
  run ends    -> response.output_audio_transcript.done, response.output_audio.done,
                 response.output_item.done, response.done (status "completed"), then the sink's
                 playout end (WebRTC: output_audio_buffer.stopped once its audio has played)
  interrupted -> (response.cancel, output_audio_buffer.clear, or truncating the item that is
                 still playing) queued audio is dropped, response.done (status "cancelled"), the
                 sink's playout clear (WebRTC: output_audio_buffer.cleared); the model's speech
                 stays muted until it yields.

Bad events get an `error` event and the session goes on: nothing a client sends raises out of
`receive` (a failure of ours is a `server_error` without internals). Events are bounded on the
way in (`Sink.max_event_bytes`; `MAX_CONTROL_EVENT_BYTES` for anything but an append), on the way
to the model (only the small fields the model side reads are forwarded, see `forwarded`, at most
`EVENT_BYTES_PER_CHUNK` a chunk, the rest in later ones) and on the way back (items are echoed
without media payloads and with long strings clipped, see `echoed`).

A session opened with a client secret that has a config bound to it holds that config as its
`ceiling`: a session.update or response.create may narrow its tools (a subset, by name) and its
tool_choice, but may not name a tool the ceiling lacks, change a field the ceiling sets
(instructions, say) or unset one; such an event gets an `error` (code "forbidden") and changes
nothing. With a ceiling that has no tools, no function tools may be added.

Audio formats (`session.audio.input/output.format`) are the transport's to apply (see
`Sink.audio_formats`): session.created/updated report what it applies, not merely what was asked.

The session ends when the host says so; `expired(now)` tells it when: after `idle_timeout_s`
without client activity (`touch`: any event, or media arriving, see `Sink.last_arrival`) or
`max_session_s` after it began (None: never). `protocols.realtime.expired_error` is the error
event to send before closing it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from protocols import SAMPLE_RATE, OutputChunk, ProtocolError, new_id
from protocols.chunks import MAX_TEXT_CHARS
from protocols.requests import Request, requests_of
from protocols.realtime import (
    DEFAULT_RATE, MAX_CONTROL_EVENT_BYTES, error_event, error_from, format_of, internal_error, is_error, parse_client_event,
    server_event, user_text,
)

from actors.ingress.playout import OUT_RATE
from actors.ingress.playout import OUT_SAMPLES as OUT_FRAME

log = logging.getLogger(__name__)

MAX_EVENTS_PER_TICK = 64  # client events waiting for the model; beyond that they are refused
EVENT_BYTES_PER_CHUNK = 32 * 1024  # forwarded events in one InputChunk (at least one; the rest wait)
MAX_TOOLS_BYTES = 16 * 1024  # function tools of a session.update or response.create, as JSON
FORWARD_CHARS = 4_000  # longer strings forwarded to the model (instructions, a tool's output) are clipped
ECHO_CHARS = 4_096  # longer strings in echoed items are clipped (typed text is at most MAX_TEXT_CHARS)
MAX_TRANSCRIPT_CHARS = 16_384  # a response's transcript as its done events carry it (the deltas have it all)
MAX_ITEMS = 32  # assistant audio items remembered per session, for conversation.item.truncate
FORCE_S = 10.0  # the longest a response.create holds "speak" without the model yielding
SPEAKING, NOT_SPEAKING = {"speak", "backchannel"}, {"silent", "yield"}


def is_speaking(out: OutputChunk) -> bool:
    """A chunk is spoken output if its controls say speak/backchannel; silent/yield say it is not.

    Without either (no controls, or only delegate/tool_call) it is spoken if it has text or any
    non-zero audio sample.
    """
    controls = set(out.controls)
    if controls & SPEAKING:
        return True
    if controls & NOT_SPEAKING:
        return False
    return bool(out.text) or bool(np.any(out.audio))


class AudioOut(Protocol):
    """Where model audio goes (PacedAudioTrack, EventAudioSink). Counters in OUT_RATE samples."""

    written: int
    position: int

    @property
    def queued_ms(self) -> float: ...

    @property
    def next_play_sample(self) -> int: ...

    def write(self, samples: np.ndarray) -> None: ...

    def clear(self) -> float: ...

    def time_of(self, sample: int) -> float | None: ...


class Sink(Protocol):
    """A session's transport as the session sees it: events out, audio out, and what differs.

    `last_arrival`: wall time the client's media last arrived (None: never, or it rides events).
    `audio_formats(input, output)`: apply the session's audio formats (format objects as in the
    session config) and return the ones that apply; a sink without it carries none (test fakes).
    """

    audio_out: AudioOut
    max_event_bytes: int
    last_arrival: float | None

    def send(self, event: dict) -> None: ...

    def append_audio(self, audio_b64: str, fmt: tuple[str, int], t_arrival: float) -> None:
        """input_audio_buffer.append in format (type, rate); a transport whose audio rides a track refuses it."""

    def audio_formats(self, input: dict, output: dict) -> tuple[dict, dict]: ...

    def clear_input(self) -> None: ...

    def audio_written(self, response_id: str, item_id: str) -> None:
        """Audio was written for this item: a transport whose client plays it sends it now."""

    def playout_started(self, response_id: str) -> None: ...

    def playout_done(self, response_id: str) -> None: ...

    def playout_cleared(self, response_id: str | None) -> None: ...


@dataclass
class NextInput:
    """What a session adds to its next InputChunk."""

    text: str = ""
    events: list[dict] = field(default_factory=list)
    forced: str | None = None
    requests: list[Request] = field(default_factory=list)  # what the events ask of the interaction side


@dataclass
class _Item:
    """An assistant audio item on the audio-out timeline (OUT_RATE samples)."""

    start: int
    end: int


@dataclass
class _Run:
    response_id: str
    item_id: str
    transcript: list[str] = field(default_factory=list)
    chars: int = 0


MERGED = ("audio", "input", "output", "interplay")  # config objects a session.update merges into


def merge(base: dict, update: dict) -> dict:
    """A session config updated: `audio` (its `input` and `output`) and `interplay` merge key by
    key; every other field is replaced whole, so an object of one kind never keeps fields of
    another (a tool choice, a turn detection, an audio format and its rate)."""
    out = dict(base)
    for key, value in update.items():
        mergeable = key in MERGED and isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if mergeable else value
    return out


def _clip(value, chars: int):
    return value[:chars] if isinstance(value, str) else value


def _pick(obj: dict, keys: tuple[str, ...]) -> dict:
    return {k: _clip(obj[k], FORWARD_CHARS) for k in keys if k in obj}


def forwarded(event: dict) -> dict:
    """What the model side gets of a (dumped) client event: its type and the few small fields it
    reads (a session.update's or response.create's tools, tool_choice and instructions; an item's
    kind, ids and a function call's arguments or output; what is truncated or deleted), long
    strings clipped. Typed text goes in the chunk's text, audio in its audio."""
    kind = event["type"]
    out: dict = {"type": kind}
    if kind == "session.update":
        out["session"] = _pick(event.get("session") or {}, ("tools", "tool_choice", "instructions"))
    elif kind == "response.create" and event.get("response"):
        out["response"] = _pick(event["response"], ("tools", "tool_choice", "instructions"))
    elif kind == "conversation.item.create":
        out["item"] = _pick(event.get("item") or {}, ("id", "type", "role", "call_id", "name", "arguments", "output"))
    elif kind == "conversation.item.truncate":
        out.update(_pick(event, ("item_id", "content_index", "audio_end_ms")))
    elif kind == "conversation.item.delete":
        out.update(_pick(event, ("item_id",)))
    elif kind == "response.cancel":
        out.update(_pick(event, ("response_id",)))
    return out


def echoed(item: dict) -> dict:
    """An item as conversation.item.added/done show it: media payloads (input audio, image data)
    left out and long strings clipped, so no item goes back at the size it came in."""
    out = {k: _clip(v, ECHO_CHARS) for k, v in item.items() if k != "content"}
    if isinstance(item.get("content"), list):
        out["content"] = [{k: _clip(v, ECHO_CHARS) for k, v in part.items() if k not in ("audio", "image_url")} for part in item["content"]]
    return out


def _size(event: dict) -> int:
    return len(json.dumps(event, ensure_ascii=False).encode("utf-8"))


def _tool_name(tool) -> str | None:
    if not isinstance(tool, dict):
        return None
    return tool.get("name") or (tool.get("function") or {}).get("name")


def beyond_ceiling(asked: dict, ceiling: dict, where: str) -> str | None:
    """Why `asked` (a session.update's session or a response.create's response) would widen what
    `ceiling` (a client secret's bound config) allows, or None. Tools narrow by name; tool_choice
    may be "none", "auto", "required" or a tool the ceiling has; any other field the ceiling sets
    is fixed."""
    allowed = {_tool_name(t) for t in ceiling.get("tools") or []}
    for tool in asked.get("tools") or []:
        if _tool_name(tool) not in allowed:
            return f"{where}.tools: {_tool_name(tool)!r} is not among the tools this client secret allows"
    choice = asked.get("tool_choice")
    if isinstance(choice, dict) and _tool_name(choice) not in allowed:
        return f"{where}.tool_choice: {_tool_name(choice)!r} is not among the tools this client secret allows"
    for key, value in asked.items():
        if key in ("tools", "tool_choice", "type") or key not in ceiling:
            continue
        fixed = ceiling[key]
        if isinstance(fixed, dict) and isinstance(value, dict):
            if merge(fixed, value) != fixed:
                return f"{where}.{key} is fixed by this client secret"
        elif value != fixed:
            return f"{where}.{key} is fixed by this client secret"
    return None


class RealtimeSession:
    """The Realtime state of one session. `prebuffer_ms` caps the margin queued ahead of each
    response (sized from how steadily outputs have come, see `prebuffer`)."""

    def __init__(
        self, sink: Sink, config: dict, *, session_id: str | None = None, prebuffer_ms: float = 60.0, force_s: float = FORCE_S,
        idle_timeout_s: float | None = None, max_session_s: float | None = None, ceiling: dict | None = None,
    ):
        self.id = session_id or new_id("sess")
        self.sink = sink
        self.ceiling = ceiling  # the config bound to the client secret that opened it, if any
        self._formats: tuple[tuple[dict, dict], tuple[dict, dict]] | None = None  # (asked, what the sink applies)
        self.config = self._apply_formats(config)
        self.prebuffer_ms = prebuffer_ms
        self.force_s = force_s
        self.idle_timeout_s = idle_timeout_s
        self.max_session_s = max_session_s
        self.started: float | None = None  # wall time of the first touch or expired() call
        self.last_active: float | None = None  # wall time of the client's last event
        self.clock_info: dict = {}  # the interaction clock, as announced in session.created
        self.first_tick: int | None = None
        self.log_token: str | None = None
        self.text: list[str] = []
        self.queued: deque[tuple[dict, int]] = deque()  # forwarded events waiting for a chunk, with their sizes
        # The opening session config reaches the model with the first chunk, like a session.update.
        opening = forwarded({"type": "session.update", "session": config})
        if opening["session"]:
            self.queued.append((opening, _size(opening)))
        self.run: _Run | None = None
        self.items: OrderedDict[str, _Item] = OrderedDict()
        self.last_response_id: str | None = None
        self.muted = False
        self.last_out_seq = -1
        self.lateness: deque[float] = deque(maxlen=100)  # seconds after its tick's end each output came
        self._force: str | None = None  # "speak" while a requested response runs
        self._force_seq: int | None = None  # the first chunk that carried it
        self._force_t: float = 0.0  # and its start time
        self._cancel = False  # a response.cancel holds "silent" on the next chunk

    # --- session --------------------------------------------------------------------------------

    def session_object(self, config: dict | None = None) -> dict:
        config = self.config if config is None else config
        extension = {**config.get("interplay", {}), "clock": {**self.clock_info, "first_tick": self.first_tick}, "log_token": self.log_token}
        return {"id": self.id, "object": "realtime.session", **config, "interplay": extension}

    def _apply_formats(self, config: dict) -> dict:
        """`config` with the audio formats the sink applies (asked only when they change)."""
        apply = getattr(self.sink, "audio_formats", None)
        if apply is None:
            return config
        audio = config.get("audio") or {}
        def asked_of(direction: str) -> dict:
            return (audio.get(direction) or {}).get("format") or {"type": "audio/pcm", "rate": DEFAULT_RATE}

        asked = (asked_of("input"), asked_of("output"))
        if self._formats is None or asked != self._formats[0]:
            applied_in, applied_out = apply(*asked)
            self._formats = (asked, (applied_in, applied_out))
        applied = self._formats[1]
        return {**config, "audio": {**audio, **{d: {**(audio.get(d) or {}), "format": f} for d, f in zip(("input", "output"), applied)}}}

    def touch(self, now: float) -> None:
        """The client was active at `now` (wall time): an event came, or its media did."""
        if self.started is None:
            self.started = now
        self.last_active = now if self.last_active is None else max(self.last_active, now)

    def expired(self, now: float) -> str | None:
        """Why the session must end at `now` (wall time), or None: idle for `idle_timeout_s` (no
        client event, no media arriving), or `max_session_s` since it began (its first touch or
        expired call). The host sends `protocols.realtime.expired_error(reason)`, then closes it."""
        if self.started is None:
            self.started = now
        if self.max_session_s is not None and now - self.started >= self.max_session_s:
            return f"the session reached its maximum length of {self.max_session_s:g} s"
        if self.idle_timeout_s is not None:
            last = max(self.last_active or self.started, getattr(self.sink, "last_arrival", None) or self.started)
            if now - last >= self.idle_timeout_s:
                return f"the session was idle for {self.idle_timeout_s:g} s"
        return None

    def created(self) -> None:
        self.sink.send(server_event("session.created", session=self.session_object()))

    # --- client events in -----------------------------------------------------------------------

    def receive(self, message: str | bytes, now: float) -> None:
        """A raw client message, arrived at `now`. Whatever is wrong with it, or goes wrong
        handling it, becomes an error event: nothing raises out of here."""
        self.touch(now)
        event_id = None
        try:
            event = self._read(message)
            if is_error(event):
                self._reply(event)
                return
            event_id = event.event_id
            self.handle(event, now)
        except ProtocolError as exc:
            self._reply(error_from(exc, event_id))
        except Exception:  # a bug must not end the session, nor tell the client our internals
            log.exception("session %s: handling a client event failed", self.id)
            self._reply(internal_error(event_id))

    def _read(self, message: object) -> Any:
        """The typed event of a raw message, or an error event (a dict) to send back."""
        if not isinstance(message, (str, bytes, bytearray)):
            return error_event("an event must be a JSON text or binary message", "invalid_json")
        size = len(message) if isinstance(message, (bytes, bytearray)) else len(message.encode("utf-8", "surrogatepass"))
        limit = self.sink.max_event_bytes
        if size > limit:
            return error_event(f"event of {size} bytes exceeds the limit of {limit} bytes", "message_too_large")
        event = parse_client_event(message, limit)
        if not is_error(event) and event.type != "input_audio_buffer.append" and size > MAX_CONTROL_EVENT_BYTES:
            return error_event(f"{event.type} of {size} bytes exceeds the limit of {MAX_CONTROL_EVENT_BYTES} bytes (larger events are audio appends)", "message_too_large", client_event_id=event.event_id)
        return event

    def _reply(self, event: dict) -> None:
        try:
            self.sink.send(event)
        except Exception:
            log.exception("session %s: sending an event failed", self.id)

    def handle(self, ev, now: float) -> None:
        """A parsed client event; ProtocolError for one that cannot be honoured. Nothing changes
        for an event that fails."""
        if len(self.queued) >= MAX_EVENTS_PER_TICK:
            raise ProtocolError(f"more than {MAX_EVENTS_PER_TICK} events wait for the model", "rate_limit_exceeded")
        kind = ev.type
        if kind == "input_audio_buffer.append":
            self.sink.append_audio(ev.audio, format_of(self.config, "input"), now)
            return  # audio is not forwarded to the model as an event: it is the chunk itself
        event = ev.dump()
        send = self.sink.send
        if kind == "session.update":
            self._check_tools(event["session"], "session")
            self._check_ceiling(event["session"], "session")
            config = merge(self.config, event["session"])
            try:  # checked before anything changes
                server_event("session.updated", session=self.session_object(config))
            except ValidationError as exc:
                message = exc.errors(include_url=False, include_input=False)[0]["msg"]
                raise ProtocolError(f"the session would not be valid with this update: {message}", "invalid_value", "session") from None
            self.config = self._apply_formats(config)
            send(server_event("session.updated", session=self.session_object()))
        elif kind == "conversation.item.create":
            text = user_text(ev.item)
            if len(text) > MAX_TEXT_CHARS or sum(map(len, self.text)) + len(text) > 4 * MAX_TEXT_CHARS:
                raise ProtocolError(f"typed text is limited to {MAX_TEXT_CHARS} characters an item", "invalid_value", "item.content")
            item = echoed({**event["item"], "object": "realtime.item", "status": "completed"})
            item["id"] = item.get("id") or new_id("item")
            added = server_event("conversation.item.added", previous_item_id=ev.previous_item_id, item=item)
            done = server_event("conversation.item.done", item=item)
            if text:
                self.text.append(text)
            send(added)
            send(done)
        elif kind == "conversation.item.truncate":
            self._truncate(ev)
        elif kind == "response.create":
            self._check_tools(event.get("response") or {}, "response")
            self._check_ceiling(event.get("response") or {}, "response")
            self._force, self._force_seq, self._cancel = "speak", None, False
        elif kind == "response.cancel":
            if self.run is None and not self.sink.audio_out.queued_ms and self._force is None:
                raise ProtocolError("there is no active response to cancel", "response_cancel_not_active")
            self._force, self._cancel = None, True
            self.interrupt()
        elif kind == "output_audio_buffer.clear":
            self.interrupt()
        elif kind == "input_audio_buffer.clear":
            self.sink.clear_input()
            send(server_event("input_audio_buffer.cleared"))
        elif kind == "conversation.item.delete":
            self.items.pop(ev.item_id, None)
            send(server_event("conversation.item.deleted", item_id=ev.item_id))
        # input_audio_buffer.commit needs no answer here: the model decides when to answer.
        slim = forwarded(event)
        self.queued.append((slim, _size(slim)))

    def _check_ceiling(self, obj: dict, where: str) -> None:
        if self.ceiling is not None and (why := beyond_ceiling(obj, self.ceiling, where)):
            raise ProtocolError(why, "forbidden", where)

    @staticmethod
    def _check_tools(obj: dict, where: str) -> None:
        if "tools" in obj and (size := _size(obj["tools"])) > MAX_TOOLS_BYTES:
            raise ProtocolError(f"the tools take {size} bytes as JSON; at most {MAX_TOOLS_BYTES}", "invalid_value", f"{where}.tools")

    def rate(self, direction: str) -> int:
        return format_of(self.config, direction)[1]

    def _truncate(self, ev) -> None:
        item = self.items.get(ev.item_id)
        if item is None:
            raise ProtocolError(f"no assistant audio item {ev.item_id!r}", "item_not_found", "item_id")
        if ev.content_index != 0:
            raise ProtocolError("assistant audio items have one content part (content_index 0)", "invalid_value", "content_index")
        audio = self.sink.audio_out
        played_ms = min(max(audio.position - item.start, 0), item.end - item.start) * 1000 / OUT_RATE
        if ev.audio_end_ms > math.ceil(played_ms):
            raise ProtocolError(f"audio_end_ms {ev.audio_end_ms} is beyond the {played_ms:.0f} ms of this item played so far", "invalid_value", "audio_end_ms")
        if (self.run and self.run.item_id == ev.item_id) or item.end > audio.position:
            self.interrupt()  # the rest of it must not play
        item.end = item.start + ev.audio_end_ms * OUT_RATE // 1000
        self.sink.send(server_event("conversation.item.truncated", item_id=ev.item_id, content_index=0, audio_end_ms=ev.audio_end_ms))

    def interrupt(self) -> None:
        """Drop what is queued to play; a running response ends "cancelled" and the model's
        speech is muted until it yields."""
        audio = self.sink.audio_out
        position = audio.position
        audio.clear()
        for item in self.items.values():  # what was not played is gone
            item.end = min(item.end, max(item.start, position))
        if self.run:
            response_id = self.run.response_id
            self._end_run(self.run, "cancelled")
            self.muted = True
        else:
            response_id = self.last_response_id
        self.sink.playout_cleared(response_id)

    # --- model input ----------------------------------------------------------------------------

    def next_input(self, seq: int, t_start: float) -> NextInput:
        """What chunk `seq` (starting at `t_start`) carries: queued text and events (at most
        `EVENT_BYTES_PER_CHUNK` of them, or one; the rest wait for the next chunks), and the
        control the client's requests hold on it."""
        text, size = [], 0
        while self.text and size + len(self.text[0]) + len(text) <= MAX_TEXT_CHARS:
            size += len(self.text[0])
            text.append(self.text.pop(0))
        events, size = [], 0
        while self.queued and (not events or size + self.queued[0][1] <= EVENT_BYTES_PER_CHUNK):
            event, n = self.queued.popleft()
            events.append(event)
            size += n
        forced = None
        if self._cancel:
            forced, self._cancel = "silent", False
        elif self._force is not None:
            if self._force_seq is None:
                self._force_seq, self._force_t = seq, t_start
            if t_start - self._force_t >= self.force_s:
                self._force = None
            else:
                forced = self._force
        return NextInput("\n".join(text), events, forced, requests_of(events))

    # --- model output ---------------------------------------------------------------------------

    def prebuffer(self) -> float:
        """The margin (ms) queued ahead of a response: enough to cover how much later than usual
        this session's outputs have come lately (p95 minus p5 of their lateness, plus 3 ms),
        never more than `prebuffer_ms`; the whole `prebuffer_ms` until there is history. The
        response then starts on a frame of the outgoing stream (see `_lead_in`), so the whole
        margin is there for a later output to be written in time."""
        if len(self.lateness) < 10:
            return self.prebuffer_ms
        spread = float(np.percentile(self.lateness, 95) - np.percentile(self.lateness, 5)) * 1000
        return min(self.prebuffer_ms, spread + 3.0)

    def deliver(self, out: OutputChunk, now: float, *, late_s: float = 0.0, in_level: float = 0.0, in_source: dict | None = None, stages: dict | None = None) -> None:
        """The model's output for tick `out.seq`, `late_s` after that tick's end; the rest is for
        interplay.tick: the tick's input level, where its input audio came from, stage times."""
        if out.seq <= self.last_out_seq:
            return  # an older tick answered after a newer one: its moment has passed
        self.last_out_seq = out.seq
        self.lateness.append(late_s)
        send = self.sink.send
        for event in out.events:
            send(event)
        if self._force is not None and self._force_seq is not None and out.seq >= self._force_seq and "yield" in out.controls:
            self._force = None  # the model yielded within the requested response: it is over
        sample = self._play(out, now)
        if self.config.get("interplay", {}).get("tick_events"):
            send(self._tick_event(out, now, in_level, in_source, stages or {}, sample))

    def _play(self, out: OutputChunk, now: float) -> int | None:
        """Play what the output says (start, continue or end the speaking run); the sample of the
        outgoing stream where its audio begins, None if it is not played."""
        send = self.sink.send
        speaking = is_speaking(out)
        if self.muted:  # interrupted: drop speech until the model yields
            if speaking:
                return None
            self.muted = False
        if not speaking:
            if self.run:
                self._end_run(self.run, "completed")
            return None
        run = self.run if self.run is not None else self._start_run(now)
        audio = self.sink.audio_out
        sample = audio.next_play_sample
        audio.write(out.audio)
        self.items[run.item_id].end = audio.written
        self.sink.audio_written(run.response_id, run.item_id)
        if out.text:
            if run.chars < MAX_TRANSCRIPT_CHARS:  # the done events carry no more than that
                run.transcript.append(out.text)
                run.chars += len(out.text)
            send(server_event("response.output_audio_transcript.delta", response_id=run.response_id, item_id=run.item_id, output_index=0, content_index=0, delta=out.text))
        return sample

    def _tick_event(self, out: OutputChunk, now: float, in_level: float, in_source: dict | None, stages: dict, sample: int | None) -> dict:
        """Our extension event: the tick's input/output level (RMS, 0..1 of full scale), the step's
        time, where its input audio came from in the caller's stream ("in", see
        AudioChunker.source), the sample of the outgoing stream (48 kHz, silence included) where
        this tick's audio begins to play (taken as it is written, after a response's lead-in;
        where the next audio would begin if the tick is not played), and the wall-clock times of
        each stage."""
        out_level = float(np.sqrt(np.mean(out.audio.astype(np.float32) ** 2)) / 32768)
        if sample is None:
            sample = self.sink.audio_out.next_play_sample
        return server_event(
            "interplay.tick", tick=out.seq, step_ms=round(out.step_ms, 3), in_level=round(in_level, 4), out_level=round(out_level, 4),
            out_sample=sample, at={**stages, "written": now, "plays": self.sink.audio_out.time_of(sample)}, **{"in": in_source},
        )

    def _lead_in(self, margin_ms: float, now: float) -> int:
        """Samples (16 kHz) of silence to queue ahead of a response so that a later output that
        comes up to `margin_ms` later than this one still plays on time. Where the audio is paced
        in frames (`time_of` known), the response starts on the first frame due `margin_ms` or
        more from `now`: a frame goes out with whatever is queued at its time, so audio that
        starts inside a frame would lose the rest of that frame from its margin."""
        audio = self.sink.audio_out
        start = audio.next_play_sample
        if audio.time_of(start) is None:  # the client plays it: the margin as queued audio
            return round(max(0.0, margin_ms - audio.queued_ms) * SAMPLE_RATE / 1000)
        target = -(-start // OUT_FRAME) * OUT_FRAME
        while (due := audio.time_of(target)) is not None and due < now + margin_ms / 1000:
            target += OUT_FRAME
        return math.ceil((target - start) * SAMPLE_RATE / OUT_RATE)

    def _start_run(self, now: float) -> _Run:
        audio = self.sink.audio_out
        lead_in = self._lead_in(self.prebuffer(), now)
        if lead_in:
            audio.write(np.zeros(lead_in, np.int16))
        run = self.run = _Run(new_id("resp"), new_id("item"))
        self.items[run.item_id] = _Item(audio.written, audio.written)
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)
        item = {"id": run.item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        send = self.sink.send
        send(server_event("response.created", response={"id": run.response_id, "object": "realtime.response", "status": "in_progress", "output": []}))
        send(server_event("response.output_item.added", response_id=run.response_id, output_index=0, item=item))
        send(server_event("conversation.item.added", item=item))
        self.sink.playout_started(run.response_id)
        return run

    def _end_run(self, run: _Run, status: str) -> None:
        self.run = None
        self.last_response_id = run.response_id
        transcript = "".join(run.transcript)[:MAX_TRANSCRIPT_CHARS]
        ids = dict(response_id=run.response_id, item_id=run.item_id, output_index=0, content_index=0)
        item = {
            "id": run.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
            "status": "completed" if status == "completed" else "incomplete",
            "content": [{"type": "output_audio", "transcript": transcript}],
        }
        send = self.sink.send
        send(server_event("response.output_audio_transcript.done", **ids, transcript=transcript))
        send(server_event("response.output_audio.done", **ids))
        send(server_event("response.output_item.done", response_id=run.response_id, output_index=0, item=item))
        send(server_event("response.done", response={"id": run.response_id, "object": "realtime.response", "status": status, "output": [item]}))
        if status == "completed":
            self.sink.playout_done(run.response_id)
