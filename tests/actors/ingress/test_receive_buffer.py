"""aiortc's receiver releases audio as it arrives once `release_on_arrival` switched it."""

import asyncio

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket

from actors.ingress.receive_buffer import ArrivalBuffer, release_on_arrival
from actors.ingress.ice import use_ice_addresses
from tests.actors.ingress.peers import Sine
from tests.waits import TIMEOUT_S


def packet(seq: int, data: bytes = b"x") -> RtpPacket:
    p = RtpPacket(sequence_number=seq, timestamp=seq * 960)
    p._data = data
    return p


def test_arrival_buffer_releases_each_packet_in_order():
    buf = ArrivalBuffer()
    got = [buf.add(packet(s))[1] for s in (65534, 65535, 0, 2)]  # wraps; a loss is no wait
    assert [f.timestamp for f in got] == [65534 * 960, 65535 * 960, 0, 2 * 960]
    assert buf.add(packet(1))[1] is None and buf.add(packet(2))[1] is None  # late, duplicate
    assert buf.add(packet(3, b""))[1] is None  # no payload: nothing to decode
    assert buf.add(packet(30_000))[1].timestamp == 30_000 * 960  # a new stream
    assert buf.released == 5 and buf.dropped == 2


async def held_frames(release: bool, frames: int = 75) -> tuple[float, list]:
    """Median count of frames the sender had sent after each frame by the time the receiving
    track handed that frame out. Counted in frames, not milliseconds: both peers share one event
    loop, so a busy machine delays them alike and the count stays what the buffer makes it."""
    use_ice_addresses(["127.0.0.1"])
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    beeps = Sine()  # `n`: the frames it has sent so far
    sender.addTrack(beeps)
    ahead: list[int] = []
    done = asyncio.Event()
    if release:
        release_on_arrival(receiver)  # before any receiver exists: switched on its "track" event

    @receiver.on("track")
    def _track(track):
        async def read():
            while len(ahead) < frames:
                frame = await track.recv()
                if frame.pts is not None and frame.pts // 960 < beeps.n:
                    ahead.append(beeps.n - 1 - frame.pts // 960)
            done.set()

        asyncio.ensure_future(read())

    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(RTCSessionDescription(receiver.localDescription.sdp, "answer"))
    await asyncio.wait_for(done.wait(), TIMEOUT_S)
    buffers = [type(getattr(r, "_RTCRtpReceiver__jitter_buffer")).__name__ for r in receiver.getReceivers()]
    await sender.close()
    await receiver.close()
    return float(np.median(ahead[10:])), buffers


@pytest.mark.timeout(180)
def test_receiver_no_longer_holds_audio_80_ms():
    default, buffers = asyncio.run(held_frames(release=False))
    assert buffers == ["JitterBuffer"] and default >= 4, default  # four 20 ms packets held
    released, buffers = asyncio.run(held_frames(release=True))
    assert buffers == ["ArrivalBuffer"] and released <= 1, released  # each handed out as it comes


def test_release_on_arrival_switches_an_existing_receiver_once():
    async def main():
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        assert release_on_arrival(pc) == 1  # the audio receiver only
        assert release_on_arrival(pc.getReceivers()[0]) == 0  # already switched
        await pc.close()

    asyncio.run(main())
