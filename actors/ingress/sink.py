"""The session's view of its transport: `Sink` (events out, model audio out, and the behaviours
that differ between transports) and `AudioOut`, where model audio goes. Protocols only: the
transports implement them (see `transports.py`), tests pass small fakes."""

from __future__ import annotations

from typing import Protocol

import numpy as np


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
