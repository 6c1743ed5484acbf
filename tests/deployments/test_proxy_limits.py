"""The Serve proxy's WebSocket frame cap (`deployments.proxy`), on the real application."""

import json

import pytest

from deployments.proxy import WS_MAX_BYTES, configure

from ..conftest import API_KEY

pytestmark = pytest.mark.timeout(300)


def test_configure_caps_every_uvicorn_server_made_after_it(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.config.Config, "__init__", uvicorn.config.Config.__init__)  # restored after
    assert configure() == [] and configure() == []  # twice is harmless
    assert uvicorn.Config(app=None).ws_max_size == WS_MAX_BYTES
    assert uvicorn.Config(app=None, ws_max_size=10).ws_max_size == 10


def test_a_frame_over_the_cap_is_refused_by_the_proxy_and_a_smaller_oversized_event_gets_an_error(app, app_url):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = app_url.replace("http://", "ws://") + "/v1/realtime"
    headers = [("Authorization", f"Bearer {API_KEY}")]
    with connect(url, additional_headers=headers, open_timeout=30, max_size=None) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        # over the per-event limit, under the proxy's cap: an error event, and the session goes on
        ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                           "content": [{"type": "input_text", "text": "x" * 400_000}]}}))
        while (event := json.loads(ws.recv(timeout=30)))["type"] != "error":
            pass
        ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        while json.loads(ws.recv(timeout=30))["type"] != "input_audio_buffer.cleared":
            pass
        # over the cap: the proxy closes the socket with 1009 instead of buffering it
        ws.send("x" * (WS_MAX_BYTES + 1))
        with pytest.raises(ConnectionClosed) as info:
            while True:
                ws.recv(timeout=30)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
