"""`RealtimeSession`: one Realtime session's protocol state; no transport, no clock, no timers.

Client events come in (`receive` a raw message, or `handle` a parsed one) and the model's
`OutputChunk`s come in (`deliver`); server events and model audio go out through the `Sink` the
session is given (its transport, `sink.py`), and `next_input(seq, t_start)` says what goes into
the session's next `InputChunk`. Times are passed in; nothing here sleeps or schedules. The
session holds its config and composes the parts that do the rest:

- `client_events.py`: events read and bounded on the way in, checked against tool limits and the
  session's `ceiling` (the config bound to the client secret that opened it, if any), and
  shaped for the model (`forwarded`) and for echoing (`echoed`);
- `model_input.py`: typed text, forwarded events and the control the client's requests hold
  (`response.create`: "speak"; `response.cancel`: "silent"), chunk by chunk;
- `responses.py`: the model's speaking runs as Realtime responses on the sink's audio out,
  interrupted by response.cancel, output_audio_buffer.clear or a truncation.

Bad events get an `error` event and the session goes on: nothing a client sends raises out of
`receive` (a failure of ours is a `server_error` without internals).

Audio formats (`session.audio.input/output.format`) are the transport's to apply (see
`Sink.audio_formats`): session.created/updated report what it applies, not merely what was asked.

The session ends when the host says so; `expired(now)` tells it when: after `idle_timeout_s`
without client activity (`touch`: any event, or media arriving, see `Sink.last_arrival`) or
`max_session_s` after it began (None: never). `protocols.realtime_events.expired_error` is the error
event to send before closing it.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import ValidationError

from protocols import OutputChunk, ProtocolError, new_id
from protocols.realtime_config import DEFAULT_RATE, format_of
from protocols.realtime_events import error_from, internal_error, is_error, server_event, user_text

from actors.ingress.client_events import check_ceiling, check_tools, echoed, forwarded, merge, read_event
from actors.ingress.model_input import FORCE_S, ModelInput, NextInput
from actors.ingress.responses import Responses
from actors.ingress.sink import Sink

log = logging.getLogger(__name__)


class RealtimeSession:
    """The Realtime state of one session. `prebuffer_ms` caps the margin queued ahead of each
    response (see `Responses.prebuffer`); `force_s` bounds how long a response.create holds
    "speak" (see `ModelInput`)."""

    def __init__(
        self, sink: Sink, config: dict, *, session_id: str | None = None, prebuffer_ms: float = 60.0, force_s: float = FORCE_S,
        idle_timeout_s: float | None = None, max_session_s: float | None = None, ceiling: dict | None = None,
    ):
        self.id = session_id or new_id("sess")
        self.sink = sink
        self.ceiling = ceiling  # the config bound to the client secret that opened it, if any
        self._formats: tuple[tuple[dict, dict], tuple[dict, dict]] | None = None  # (asked, what the sink applies)
        self.config = self._apply_formats(config)
        self.idle_timeout_s = idle_timeout_s
        self.max_session_s = max_session_s
        self.started: float | None = None  # wall time of the first touch or expired() call
        self.last_active: float | None = None  # wall time of the client's last event
        self.clock_info: dict = {}  # the interaction clock, as announced in session.created
        self.first_tick: int | None = None
        self.log_token: str | None = None
        self.input = ModelInput(force_s)
        # The opening session config reaches the model with the first chunk, like a session.update.
        opening = forwarded({"type": "session.update", "session": config})
        if opening["session"]:
            self.input.queue(opening)
        self.responses = Responses(sink, prebuffer_ms)
        self.last_out_seq = -1

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
        expired call). The host sends `protocols.realtime_events.expired_error(reason)`, then closes it."""
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
            event = read_event(message, self.sink.max_event_bytes)
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

    def _reply(self, event: dict) -> None:
        try:
            self.sink.send(event)
        except Exception:
            log.exception("session %s: sending an event failed", self.id)

    def handle(self, ev, now: float) -> None:
        """A parsed client event; ProtocolError for one that cannot be honoured. Nothing changes
        for an event that fails."""
        self.input.check_room()
        kind = ev.type
        if kind == "input_audio_buffer.append":
            self.sink.append_audio(ev.audio, format_of(self.config, "input"), now)
            return  # audio is not forwarded to the model as an event: it is the chunk itself
        event = ev.dump()
        send = self.sink.send
        if kind == "session.update":
            check_tools(event["session"], "session")
            check_ceiling(event["session"], self.ceiling, "session")
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
            self.input.check_text(text)
            item = echoed({**event["item"], "object": "realtime.item", "status": "completed"})
            item["id"] = item.get("id") or new_id("item")
            added = server_event("conversation.item.added", previous_item_id=ev.previous_item_id, item=item)
            done = server_event("conversation.item.done", item=item)
            self.input.add_text(text)
            send(added)
            send(done)
        elif kind == "conversation.item.truncate":
            self.responses.truncate(ev.item_id, ev.content_index, ev.audio_end_ms)
        elif kind == "response.create":
            check_tools(event.get("response") or {}, "response")
            check_ceiling(event.get("response") or {}, self.ceiling, "response")
            self.input.request_response()
        elif kind == "response.cancel":
            if not self.responses.active and not self.input.holds_response:
                raise ProtocolError("there is no active response to cancel", "response_cancel_not_active")
            self.input.cancel_response()
            self.responses.interrupt()
        elif kind == "output_audio_buffer.clear":
            self.responses.interrupt()
        elif kind == "input_audio_buffer.clear":
            self.sink.clear_input()
            send(server_event("input_audio_buffer.cleared"))
        elif kind == "conversation.item.delete":
            self.responses.forget(ev.item_id)
            send(server_event("conversation.item.deleted", item_id=ev.item_id))
        # input_audio_buffer.commit needs no answer here: the model decides when to answer.
        self.input.queue(forwarded(event))

    # --- model input ----------------------------------------------------------------------------

    def next_input(self, seq: int, t_start: float) -> NextInput:
        """What chunk `seq` (starting at `t_start`) carries (see `ModelInput.next`)."""
        return self.input.next(seq, t_start)

    # --- model output ---------------------------------------------------------------------------

    def deliver(self, out: OutputChunk, now: float, *, late_s: float = 0.0, in_level: float = 0.0, in_source: dict | None = None, stages: dict | None = None) -> None:
        """The model's output for tick `out.seq`, `late_s` after that tick's end; the rest is for
        interplay.tick: the tick's input level, where its input audio came from, stage times."""
        if out.seq <= self.last_out_seq:
            return  # an older tick answered after a newer one: its moment has passed
        self.last_out_seq = out.seq
        self.responses.lateness.append(late_s)
        send = self.sink.send
        for event in out.events:
            send(event)
        self.input.seen(out)
        sample = self.responses.play(out, now)
        if self.config.get("interplay", {}).get("tick_events"):
            send(self._tick_event(out, now, in_level, in_source, stages or {}, sample))

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
