"""The two transports drive the same RealtimeSession code; what differs is theirs alone."""

import asyncio
import base64
import json
import time

import numpy as np
import pytest

from actors.ingress import Ingress
from actors.realtime_session import RealtimeSession
from actors.transports import WebRTCTransport, WebSocketTransport
from protocols import OutputChunk, TickClock
from protocols.realtime import encode_pcm16
from tests.actors.test_ingress import Client, Echo, FakeChannel

pytestmark = pytest.mark.timeout(30)

TONE = (8000 * np.sin(np.arange(3200) / 5)).astype(np.int16)
SILENCE = np.zeros(3200, np.int16)
ONLY_WEBRTC = {"output_audio_buffer.started", "output_audio_buffer.stopped", "output_audio_buffer.cleared"}
ONLY_WEBSOCKET = {"response.output_audio.delta"}
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
    """An event without what is fresh each time (ids)."""
    drop = {"event_id", "response_id", "item_id", "id"}
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


def test_input_audio_events_are_websocket_only_and_checked():
    async def main():
        rtc = WebRTCTransport(TickClock(0.0))
        rtc.channel = FakeChannel()
        ws = WebSocketTransport(TickClock(0.0), max_input_s=1.0)
        for transport in (rtc, ws):
            s = RealtimeSession(transport, {"type": "realtime"})
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": "not base64!"}), time.time())
            s.receive(json.dumps({"type": "input_audio_buffer.append", "audio": encode_pcm16(np.zeros(24_000 * 2, np.int16))}), time.time())
        ws_errors = [json.loads(ws.outbox.get_nowait())["error"]["code"] for _ in range(ws.outbox.qsize())]
        assert ws_errors == ["invalid_audio", "input_audio_buffer_full"]
        assert [e["error"]["code"] for e in rtc.channel.sent] == ["unsupported_event", "unsupported_event"]
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
        await asyncio.sleep(1.3)
        mine = [c for c in echo.chunks if c.session_id == sid]
        assert sum(not c.missing and np.abs(c.audio).max() > 6000 for c in mine) >= 4  # the appended audio, a chunk a tick
        assert [c.forced for c in mine[:2]] == ["speak", "speak"]
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
        await asyncio.sleep(1.0)
        both = [ids for _, ids in echo.calls if set(ids) == {rtc_id, ws_id}]
        assert len(both) >= 3
        assert type(ingress.sessions[rtc_id].session) is type(ingress.sessions[ws_id].session) is RealtimeSession
        await client.pc.close()
        await ingress.shutdown()

    asyncio.run(main())
