"""`ModelInput`: what a session's client events put into its next InputChunks; no clock, no timers.

Each chunk carries the typed user text waiting (at most `MAX_TEXT_CHARS`), the forwarded client
events waiting (at most `EVENT_BYTES_PER_CHUNK` of them, or one; the rest in later chunks), the
typed requests those events make of the interaction side (`protocols.requests`), and `forced`,
the control the client's requests hold: `response.create` holds "speak" from the next chunk on,
until an output of those chunks shows "yield" or `force_s` of them have passed;
`response.cancel` holds "silent" for one chunk. At most `MAX_EVENTS_PER_TICK` events wait.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from protocols import OutputChunk, ProtocolError
from protocols.chunks import MAX_TEXT_CHARS
from protocols.requests import Request, requests_of

from actors.ingress.client_events import json_bytes

MAX_EVENTS_PER_TICK = 64  # client events waiting for the model; beyond that they are refused
EVENT_BYTES_PER_CHUNK = 32 * 1024  # forwarded events in one InputChunk (at least one; the rest wait)
FORCE_S = 10.0  # the longest a response.create holds "speak" without the model yielding


@dataclass
class NextInput:
    """What a session adds to its next InputChunk."""

    text: str = ""
    events: list[dict] = field(default_factory=list)
    forced: str | None = None
    requests: list[Request] = field(default_factory=list)  # what the events ask of the interaction side


class ModelInput:
    """One session's typed text and forwarded events waiting for the model, and the control its
    client's requests hold."""

    def __init__(self, force_s: float = FORCE_S):
        self.force_s = force_s
        self.text: list[str] = []
        self.queued: deque[tuple[dict, int]] = deque()  # forwarded events waiting for a chunk, with their sizes
        self._force: str | None = None  # "speak" while a requested response runs
        self._force_seq: int | None = None  # the first chunk that carried it
        self._force_t: float = 0.0  # and its start time
        self._cancel = False  # a response.cancel holds "silent" on the next chunk

    def check_room(self) -> None:
        """ProtocolError when `MAX_EVENTS_PER_TICK` events already wait for the model."""
        if len(self.queued) >= MAX_EVENTS_PER_TICK:
            raise ProtocolError(f"more than {MAX_EVENTS_PER_TICK} events wait for the model", "rate_limit_exceeded")

    def check_text(self, text: str) -> None:
        """ProtocolError when typed `text` is longer than an item may be, or than may wait."""
        if len(text) > MAX_TEXT_CHARS or sum(map(len, self.text)) + len(text) > 4 * MAX_TEXT_CHARS:
            raise ProtocolError(f"typed text is limited to {MAX_TEXT_CHARS} characters an item", "invalid_value", "item.content")

    def add_text(self, text: str) -> None:
        if text:
            self.text.append(text)

    def queue(self, event: dict) -> None:
        """A forwarded event (see `client_events.forwarded`) for the next chunks."""
        self.queued.append((event, json_bytes(event)))

    @property
    def holds_response(self) -> bool:
        """A requested response holds "speak"."""
        return self._force is not None

    def request_response(self) -> None:
        self._force, self._force_seq, self._cancel = "speak", None, False

    def cancel_response(self) -> None:
        self._force, self._cancel = None, True

    def seen(self, out: OutputChunk) -> None:
        """The model's output for a chunk: "yield" in one that carried "speak" ends the response."""
        if self._force is not None and self._force_seq is not None and out.seq >= self._force_seq and "yield" in out.controls:
            self._force = None  # the model yielded within the requested response: it is over

    def next(self, seq: int, t_start: float) -> NextInput:
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
