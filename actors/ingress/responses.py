"""`Responses`: the model's speech on one session, as Realtime responses; no clock, no timers.

The model's outputs come in (`play`, one per tick) and become speaking runs (consecutive speaking
chunks, see `is_speaking`) on the sink's audio out, each one response with one assistant audio
item. Output events, per speaking run:
  run starts  -> response.created, response.output_item.added, conversation.item.added,
                 then the sink's playout start (WebRTC: output_audio_buffer.started)
  each chunk  -> the sink's audio (WebSocket: response.output_audio.delta),
                 response.output_audio_transcript.delta (when it carries text)
  run ends    -> response.output_audio_transcript.done, response.output_audio.done,
                 response.output_item.done, response.done (status "completed"), then the sink's
                 playout end (WebRTC: output_audio_buffer.stopped once its audio has played)
  interrupted -> (`interrupt`: response.cancel, output_audio_buffer.clear, or `truncate` of the
                 item that is still playing) queued audio is dropped, response.done (status
                 "cancelled"), the sink's playout clear (WebRTC: output_audio_buffer.cleared);
                 the model's speech stays muted until it yields.
A response's transcript in its done events is at most `MAX_TRANSCRIPT_CHARS` (the deltas carry
it all); the last `MAX_ITEMS` items are remembered for truncation.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from protocols import SAMPLE_RATE, OutputChunk, ProtocolError, new_id
from protocols.realtime_events import server_event

from actors.ingress.playout import OUT_RATE
from actors.ingress.playout import OUT_SAMPLES as OUT_FRAME
from actors.ingress.sink import Sink

MAX_TRANSCRIPT_CHARS = 16_384  # a response's transcript as its done events carry it (the deltas have it all)
MAX_ITEMS = 32  # assistant audio items remembered per session, for conversation.item.truncate

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


class Responses:
    """One session's speaking run, its assistant audio items on the audio-out timeline, and
    whether the model's speech is muted after an interruption. `prebuffer_ms` caps the margin
    queued ahead of each response (sized from how steadily outputs have come, see `prebuffer`;
    the host records each output's `lateness`)."""

    def __init__(self, sink: Sink, prebuffer_ms: float = 60.0):
        self.sink = sink
        self.prebuffer_ms = prebuffer_ms
        self.run: _Run | None = None
        self.items: OrderedDict[str, _Item] = OrderedDict()
        self.last_response_id: str | None = None
        self.muted = False
        self.lateness: deque[float] = deque(maxlen=100)  # seconds after its tick's end each output came

    @property
    def active(self) -> bool:
        """A response runs, or its audio is still queued to play."""
        return self.run is not None or bool(self.sink.audio_out.queued_ms)

    def forget(self, item_id: str) -> None:
        """conversation.item.delete: the item is forgotten (truncating it then fails)."""
        self.items.pop(item_id, None)

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

    def play(self, out: OutputChunk, now: float) -> int | None:
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

    def truncate(self, item_id: str, content_index: int, audio_end_ms: int) -> None:
        """conversation.item.truncate: the item's audio ends at `audio_end_ms`, which must be within
        what has played; an item still playing is interrupted."""
        item = self.items.get(item_id)
        if item is None:
            raise ProtocolError(f"no assistant audio item {item_id!r}", "item_not_found", "item_id")
        if content_index != 0:
            raise ProtocolError("assistant audio items have one content part (content_index 0)", "invalid_value", "content_index")
        audio = self.sink.audio_out
        played_ms = min(max(audio.position - item.start, 0), item.end - item.start) * 1000 / OUT_RATE
        if audio_end_ms > math.ceil(played_ms):
            raise ProtocolError(f"audio_end_ms {audio_end_ms} is beyond the {played_ms:.0f} ms of this item played so far", "invalid_value", "audio_end_ms")
        if (self.run and self.run.item_id == item_id) or item.end > audio.position:
            self.interrupt()  # the rest of it must not play
        item.end = item.start + audio_end_ms * OUT_RATE // 1000
        self.sink.send(server_event("conversation.item.truncated", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms))

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
