"""The receive buffer: aiortc's audio receivers release each packet to the decoder on arrival.

- `ArrivalBuffer`: stands in for aiortc's audio JitterBuffer; each RTP packet is released at once,
  in order (late and duplicated packets are dropped).
- `release_on_arrival(pc_or_receiver)`: installs it, so aiortc's receiver hands each audio packet
  on to the decoder as it arrives instead of holding four (about 80 ms) in its jitter buffer: the
  AudioChunker's own margin is the only receive-side buffer.
"""

from __future__ import annotations

from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.utils import uint16_add


class ArrivalBuffer:
    """Stands in for aiortc's audio JitterBuffer: each RTP packet is one frame, released at once.

    aiortc's own buffer (capacity 16, prefetch 4) holds an audio packet until four later ones
    came, about 80 ms on 20 ms packets, and even with prefetch 0 until the next one came. An
    audio packet is a whole frame, so here it goes to the decoder on arrival, in order: a packet
    older than the newest one released (reordered, duplicated) is dropped, as a late packet is
    by any playout buffer; one more than `MAX_MISORDER` behind starts a new stream.
    """

    MAX_MISORDER = 100
    capacity = 16

    def __init__(self) -> None:
        self._last: int | None = None
        self.released = 0
        self.dropped = 0

    def add(self, packet) -> tuple[bool, JitterFrame | None]:
        seq = packet.sequence_number
        if self._last is not None:
            behind = uint16_add(self._last, -seq)  # 0: a duplicate
            if behind <= self.MAX_MISORDER:
                self.dropped += 1
                return False, None
        self._last = seq
        data = getattr(packet, "_data", b"")
        if not data:
            return False, None
        self.released += 1
        return False, JitterFrame(data=data, timestamp=packet.timestamp)


_BUFFER = "_RTCRtpReceiver__jitter_buffer"


def release_on_arrival(target) -> int:
    """Make aiortc audio receivers release packets as they arrive (see `ArrivalBuffer`).

    `target`: an `RTCPeerConnection` (every audio receiver it has now, and any a later
    negotiation adds, via its "track" event) or one `RTCRtpReceiver`. Call it right after
    `setRemoteDescription` (or `addTrack`), before media flows. Returns how many receivers were
    switched now; raises RuntimeError if this aiortc keeps its audio buffer elsewhere.
    """
    receivers = target.getReceivers() if hasattr(target, "getReceivers") else [target]
    switched = sum(_switch(r) for r in receivers)
    if hasattr(target, "getReceivers") and not getattr(target, "_released_on_arrival", False):
        target._released_on_arrival = True

        @target.on("track")
        def _later(track) -> None:
            for r in target.getReceivers():
                if r.track is track:
                    _switch(r)

    return switched


def _switch(receiver) -> bool:
    track = getattr(receiver, "track", None)
    kind = getattr(receiver, "_RTCRtpReceiver__kind", None) or getattr(track, "kind", None)
    if kind != "audio":
        return False
    current = getattr(receiver, _BUFFER, None)
    if isinstance(current, ArrivalBuffer):
        return False
    if not isinstance(current, JitterBuffer):
        raise RuntimeError("this aiortc keeps no audio JitterBuffer where release_on_arrival expects it")
    setattr(receiver, _BUFFER, ArrivalBuffer())
    return True
