"""The two transports drive the same RealtimeSession code; what differs is theirs alone."""

import asyncio
import base64
import json
import time

import numpy as np
import pytest

from actors.ingress.ingress import Ingress
from actors.ingress.realtime_session import RealtimeSession
from actors.ingress.transports import TRACK_FORMAT, WebRTCTransport, WebSocketTransport
from protocols import OutputChunk, TickClock
from protocols.realtime_audio import encode_pcm16
from tests.actors.ingress.peers import Client, Echo, FakeChannel
from tests.waits import until

pytestmark = pytest.mark.timeout(120)

TONE = (8000 * np.sin(np.arange(3200) / 5)).astype(np.int16)
SILENCE = np.zeros(3200, np.int16)
ONLY_WEBRTC = {"output_audio_buffer.started", "output_audio_buffer.stopped", "output_audio_buffer.cleared"}
ONLY_WEBSOCKET = {"response.output_audio.delta"}
PCM24 = {"type": "audio/pcm", "rate": 24000}
SCRIPT = [  # client events and outputs, in order
    {"type": "session.update", "session": {"instructions": "be brief"}},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
    {"type": "response.create"},
    (0, ["speak"], "hel"), (1, ["speak"], "lo"), (2, ["yield"], ""),
    {"type": "no.such.event"},
    (3, ["speak"], "again"),
    {"type": "output_audio_buffer.clear"},
    (4, ["speak"], "muted"), (5, ["silent"], ""), (6, ["speak"], "last"), (7, ["silent"], ""),
    {"type": "input_audio_buffer.clear"},
]


def drive(transport, events) -> tuple[RealtimeSession, list]:
    s = RealtimeSession(transport, {"type": "realtime"}, session_id="sess_same")
    inputs = []
    for step in SCRIPT:
        if isinstance(step, dict):
            s.receive(json.dumps(step), time.time())
        else:
            seq, controls, text = step
            inputs.append(s.next_input(seq, seq * 0.2))
            s.deliver(OutputChunk(s.id, seq, seq * 0.2, TONE if text else SILENCE, text=text, controls=controls), time.time())
    return s, inputs


def shape(event: dict) -> dict:
    """An event without what is fresh each time (ids), nor the session's audio formats (each
    transport says what it carries)."""
    drop = {"event_id", "response_id", "item_id", "id", "audio"}
    if isinstance(event, dict):
        return {k: shape(v) for k, v in event.items() if k not in drop}
    if isinstance(event, list):
        return [shape(v) for v in event]
    return event


def test_websocket_and_webrtc_drive_the_same_session_code():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        ws = WebSocketTransport(TickClock(0.0))
        s_rtc, in_rtc = drive(rtc, SCRIPT)
        s_ws, in_ws = drive(ws, SCRIPT)
        ws_events = []
        while not ws.outbox.empty():
            ws_events.append(json.loads(ws.outbox.get_nowait()))
        rtc_events = rtc.channel.sent
        assert type(s_rtc) is type(s_ws) is RealtimeSession
        # the same events, modulo the ones that belong to one transport
        common_rtc = [shape(e) for e in rtc_events if e["type"] not in ONLY_WEBRTC]
        common_ws = [shape(e) for e in ws_events if e["type"] not in ONLY_WEBSOCKET]
        assert common_rtc == common_ws
        formats = [{d: e["session"]["audio"][d]["format"] for d in ("input", "output")} for e in (rtc_events[0], ws_events[0])]
        assert formats == [{"input": TRACK_FORMAT, "output": TRACK_FORMAT}, {"input": PCM24, "output": PCM24}]
        assert len({e["type"] for e in common_ws}) >= 10 and [e for e in common_ws if e["type"] == "error"]
        # the same model inputs
        assert [(i.text, i.forced, [e["type"] for e in i.events]) for i in in_rtc] == [(i.text, i.forced, [e["type"] for e in i.events]) for i in in_ws]
        assert [i.forced for i in in_ws][:3] == ["speak", "speak", "speak"]
        # and what differs: the server plays WebRTC audio, a WebSocket client plays deltas
        only_rtc = [e["type"] for e in rtc_events if e["type"] in ONLY_WEBRTC]
        assert only_rtc == ["output_audio_buffer.started", "output_audio_buffer.stopped", "output_audio_buffer.started", "output_audio_buffer.cleared", "output_audio_buffer.started"]
        deltas = [e for e in ws_events if e["type"] in ONLY_WEBSOCKET]
        assert len(deltas) == 4 and all(len(base64.b64decode(d["delta"])) > 0 for d in deltas)
        await rtc.close()
        await ws.close()

    asyncio.run(main())


def test_speaking_runs_become_realtime_responses_on_a_played_track():
    """The event sequence of a response over WebRTC, without a network: speak, speak, yield, drain."""

    async def main():
        transport = WebRTCTransport(TickClock(0.0))
        transport.channel = FakeChannel()
        s = RealtimeSession(transport, {"type": "realtime"})
        delivered = time.monotonic()
        for seq, controls, text in [(0, ["speak"], "hel"), (1, [], "lo"), (2, ["yield"], ""), (3, [], "")]:
            s.deliver(OutputChunk(s.id, seq, seq * 0.2, TONE if seq < 2 else SILENCE, text=text, controls=controls), time.time())
        s.deliver(OutputChunk(s.id, 1, 0.2, TONE, controls=["speak"]), time.time())  # stale: ignored
        assert transport.audio_out.queued_ms == pytest.approx(460, abs=2)  # 60 ms margin + two chunks
        sent = transport.channel.sent
        types = [e["type"] for e in sent]
        assert types == [
            "response.created", "response.output_item.added", "conversation.item.added", "output_audio_buffer.started",
            "response.output_audio_transcript.delta", "response.output_audio_transcript.delta",
            "response.output_audio_transcript.done", "response.output_audio.done", "response.output_item.done", "response.done",
        ]
        done = sent[-1]["response"]
        assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == "hello"
        await until(lambda: sent[-1]["type"] == "output_audio_buffer.stopped")
        assert sent[-1]["response_id"] == done["id"] and len(sent) == len(types) + 1
        # not before the queued audio would have played out (1 ms for the clock's rounding)
        assert transport.channel.sent_at[-1] - delivered >= transport.audio_out.queued_ms / 1000 - 0.001
        await transport.close()

    asyncio.run(main())


def test_input_audio_events_are_websocket_only_and_checked():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        ws = WebSocketTransport(TickClock(0.0), max_input_s=1.0)
        for transport in (rtc, ws):
            s = RealtimeSession(transport, {"type": "realtime"})
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": "not base64!"}), time.time())
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": ""}), time.time())
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": "AAA="}), time.time())  # one sample: fine
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(24_000 * 2, np.int16))}), time.time())
        ws_errors = [json.loads(ws.outbox.get_nowait())["error"] for _ in range(ws.outbox.qsize())]
        assert [(e["code"], e["param"]) for e in ws_errors] == [("invalid_value", "audio"), ("invalid_value", "audio"), ("input_audio_buffer_full", "audio")]
        assert "base64" in ws_errors[0]["message"] and "empty" in ws_errors[1]["message"]
        assert [e["error"]["code"] for e in rtc.channel.sent] == ["unsupported_event"] * 4
        await rtc.close()
        await ws.close()

    asyncio.run(main())


def test_a_websocket_session_through_the_ingress():
    async def main():
        echo = Echo()
        ingress = Ingress(echo, TickClock(time.time()))
        sid, outbox = await ingress.open_websocket({"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}})
        first = json.loads(await outbox.get())
        assert first["type"] == "session.created" and first["session"]["interplay"]["log_token"] == f"token-{sid}"
        tone = (8000 * np.sin(np.arange(16_000) / 5)).astype(np.int16)
        for i in range(0, len(tone), 1600):
            ingress.receive(sid, json.dumps({"type": "input_audio_buffer.append", "audio": encode_pcm16(tone[i : i + 1600])}))
        ingress.receive(sid, json.dumps({"type": "response.create"}))
        ingress.receive(sid, b"\xff not json")

        def mine():
            return [c for c in echo.chunks if c.session_id == sid]

        await until(lambda: sum(not c.missing and np.abs(c.audio).max() > 6000 for c in mine()) >= 4)  # the appended audio, a chunk a tick
        assert [c.forced for c in mine()[:2]] == ["speak", "speak"]
        await ingress.close(sid)
        events = []
        while (text := await outbox.get()) is not None:
            events.append(json.loads(text))
        types = {e["type"] for e in events}
        assert {"response.created", "response.output_audio.delta", "response.output_audio_transcript.delta", "error"} <= types
        assert not types & ONLY_WEBRTC
        pcm = base64.b64decode(next(e for e in events if e["type"] == "response.output_audio.delta")["delta"])
        assert len(pcm) // 2 >= 3200  # 16 kHz out, as the session asked: one chunk plus its margin
        assert echo.left == [sid] and (await ingress.stats())["sessions"] == 0
        await ingress.shutdown()

    asyncio.run(main())


def test_a_webrtc_call_and_a_websocket_share_each_tick():
    async def main():
        echo = Echo()
        ingress = Ingress(echo, TickClock(time.time()))
        client = Client()
        rtc_id = await client.connect(ingress)
        ws_id, _ = await ingress.open_websocket(None)
        await client.wait_for("session.created")
        both = lambda: [ids for _, ids in echo.calls if set(ids) == {rtc_id, ws_id}]  # noqa: E731
        await until(lambda: len(both()) >= 3)  # one exchange a tick carries both
        assert type(ingress.sessions[rtc_id].session) is type(ingress.sessions[ws_id].session) is RealtimeSession
        await client.pc.close()
        await ingress.shutdown()

    asyncio.run(main())


def test_websocket_audio_formats_apply_both_ways():
    """G.711 in and out, and a changed output rate, as session.update confirms them."""
    from protocols.realtime_audio import decode_audio, encode_audio

    async def main():
        ws = WebSocketTransport(TickClock(0.0))
        s = RealtimeSession(ws, {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}})
        tone8k = (8000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
        s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": encode_audio(tone8k, "audio/pcmu")}), time.time())
        assert ws.audio_in.buffered_s == pytest.approx(1.0, abs=0.01)  # 8 kHz in, 16 kHz kept
        s.receive(json.dumps({"type": "input_audio_buffer.clear"}), time.time())

        def delta_after(seq, kind):
            s.deliver(OutputChunk(s.id, seq, seq * 0.2, TONE, text="x", controls=["speak"]), time.time())
            while not ws.outbox.empty():
                event = json.loads(ws.outbox.get_nowait())
                if event["type"] == "response.output_audio.delta":
                    return decode_audio(event["delta"], kind)
                assert event["type"] != "error", event

        pcm24 = delta_after(0, "audio/pcm")
        assert len(pcm24) >= 4800  # 200 ms at 24 kHz (and the margin before it)
        for seq, fmt, rate in [(1, {"type": "audio/pcma"}, 8000), (2, {"type": "audio/pcmu"}, 8000), (3, {"type": "audio/pcm", "rate": 16000}, 16000)]:
            s.receive(json.dumps({"type": "session.update", "session": {"audio": {"output": {"format": fmt}}}}), time.time())
            kind = fmt["type"]
            samples = delta_after(seq, kind)
            assert abs(len(samples) - rate // 5) <= 40, (kind, len(samples))  # 200 ms at its rate
            assert np.sqrt(np.mean(samples[100:].astype(np.float64) ** 2)) > 3000, kind  # the tone, not noise
        assert s.config["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 16000}
        await ws.close()

    asyncio.run(main())


def test_webrtc_sessions_report_the_tracks_formats():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        s = RealtimeSession(rtc, {"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}})
        s.created()
        s.receive(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcma"}}}}}), time.time())
        for event in rtc.channel.sent:
            assert event["type"] in ("session.created", "session.updated")
            assert event["session"]["audio"]["input"]["format"] == event["session"]["audio"]["output"]["format"] == TRACK_FORMAT
        await rtc.close()

    asyncio.run(main())


def test_a_failing_data_channel_handler_is_an_error_not_a_dead_channel():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()

        def broken(message):
            raise RecursionError("maximum recursion depth exceeded")

        rtc.on_message = broken
        rtc._message('{"type": "response.create"}')  # what aiortc calls: it must not raise into SCTP
        (error,) = rtc.channel.sent
        assert error["error"]["code"] == "server_error" and "recursion" not in error["error"]["message"]
        await rtc.close()

    asyncio.run(main())


def test_events_are_bounded_on_both_transports():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        ws = WebSocketTransport(TickClock(0.0))
        assert rtc.max_event_bytes == ws.max_event_bytes == 256 * 1024
        big = json.dumps({"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(200_000, np.int16))})  # 530 KB
        for transport in (rtc, ws):
            s = RealtimeSession(transport, {"type": "realtime"})
            s.receive(big, time.time())
        (ws_error,) = [json.loads(ws.outbox.get_nowait()) for _ in range(ws.outbox.qsize())]
        assert ws_error["error"]["code"] == rtc.channel.sent[0]["error"]["code"] == "message_too_large"
        await rtc.close()
        await ws.close()

    asyncio.run(main())


def test_events_before_the_data_channel_opens_wait_for_it():
    """Media can come up before the data channel: a response started then is still announced."""

    class Channel(FakeChannel):
        label = "oai-events"

        def on(self, name, handler):
            self.handler = handler

    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        s = RealtimeSession(rtc, {"type": "realtime"})
        rtc.on_open = s.created
        rtc.on_message = lambda message: s.receive(message, time.time())
        s.deliver(OutputChunk(s.id, 0, 0.0, TONE, text="hi", controls=["speak"]), time.time())
        channel = Channel()
        rtc.pc.emit("datachannel", channel)
        types = [e["type"] for e in channel.sent]
        assert types[0] == "session.created" and types[1:4] == ["response.created", "response.output_item.added", "conversation.item.added"]
        channel.handler('{"type": "input_audio_buffer.clear"}')  # and the channel's messages reach the session
        assert channel.sent[-1]["type"] == "input_audio_buffer.cleared"
        await rtc.close()

    asyncio.run(main())


def test_clearing_the_output_before_any_response_is_no_failure():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        s = RealtimeSession(rtc, {"type": "realtime"})
        s.receive(json.dumps({"type": "output_audio_buffer.clear"}), time.time())
        assert rtc.channel.sent == []  # nothing played, nothing cleared, no error
        s.deliver(OutputChunk(s.id, 0, 0.0, TONE, controls=["speak"]), time.time())
        s.receive(json.dumps({"type": "output_audio_buffer.clear"}), time.time())
        assert [e["type"] for e in rtc.channel.sent][-1] == "output_audio_buffer.cleared"
        await rtc.close()

    asyncio.run(main())


def test_a_call_whose_negotiation_failed_closes_cleanly():
    """An offer whose data-channel section lost its m= line (its attributes then sit in the audio
    section) fails to negotiate; closing that call must not raise over the ProtocolError."""
    from aiortc import RTCPeerConnection

    from protocols import ProtocolError

    async def main():
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = "\r\n".join(line for line in pc.localDescription.sdp.split("\r\n") if not line.startswith("m=application"))
        rtc = WebRTCTransport(TickClock(0.0))
        with pytest.raises(ProtocolError):
            await rtc.negotiate(sdp)
        await rtc.close()
        await rtc.close()  # twice: still nothing raised
        echo = Echo()
        ingress = Ingress(echo, TickClock(time.time()))
        with pytest.raises(ProtocolError) as info:
            await ingress.offer(sdp)
        assert info.value.code == "invalid_sdp" and not ingress.sessions and not echo.members
        await ingress.shutdown()
        await pc.close()

    asyncio.run(main())
