"""The WebSocket edge (`deployments.websocket`), served in process (`tests.deployments.edge_server`)
and driven by real clients and raw sockets: a handshake dropped after it was accepted, an exception
while handling a client message, a session ended by the server, a bound secret in the handshake.
"""

import json
import socket

import pytest

from tests.waits import wait_for

from .edge_server import KEY, _frame, _upgrade, secret, server, ws_connect  # noqa: F401 (server: a fixture)

pytestmark = pytest.mark.timeout(120)


def test_a_websocket_made_with_a_bound_secret_gets_that_config(server):
    token = secret(server, {"session": {"type": "realtime", "instructions": "bound words"}})
    with ws_connect(server, [("Authorization", f"Bearer {token}")]) as ws:
        created = json.loads(ws.recv(timeout=10))
    assert created["type"] == "session.created" and created["session"]["instructions"] == "bound words"
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


def _drop(port: int, step: int) -> None:
    """One client that gives up at `step` of a WebSocket's life, some abruptly (RST)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if step % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
        sock.sendall(_upgrade(port))
        kind = step % 6
        if kind in (0, 1):
            return  # gone before the accept (mid-join, usually)
        reply = b""
        while b"\r\n\r\n" not in reply:
            more = sock.recv(4096)
            if not more:
                return
            reply += more
        if kind == 2:
            return  # gone right after the accept
        if kind == 3:
            sock.sendall(_frame(b'{"type": "session.update", "session": {"type": "realtime"}}'))
        elif kind == 4:
            sock.sendall(_frame(b"\x03\xe8", opcode=8))  # a clean close
        else:
            sock.sendall(_frame(b'{"type": "input_audio_buffer.append", "audio": "AAAA"}')[:5])  # half a frame
    except OSError:
        pass
    finally:
        sock.close()


def test_dropped_websocket_handshakes_leak_no_session(server):
    """100 clients that drop at different steps (before, at and after the accept, mid-frame,
    with a reset): every session they opened is closed, and a new caller gets in."""
    for i in range(100):
        _drop(server.port, i)
    wait_for(lambda: server.sessions() == 0, message=server.sessions)
    assert server.websockets.max_sessions == 16
    with ws_connect(server, [("Authorization", f"Bearer {KEY}")]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


def test_a_failing_message_gets_an_error_event_and_the_session_goes_on(server, monkeypatch):
    real = server.websockets.receive

    def receive(session_id, message):
        if "boom" in str(message):
            raise RuntimeError("a bug (pid=1) in /work/main/actors/ingress/realtime_session.py")
        return real(session_id, message)

    monkeypatch.setattr(server.websockets, "receive", receive)
    with ws_connect(server, [("Authorization", f"Bearer {KEY}")]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "boom"}))
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "still here"}}))
        seen = []
        while "session.updated" not in seen:
            event = json.loads(ws.recv(timeout=10))
            seen.append(event["type"])
            if event["type"] == "error":
                assert event["error"]["code"] == "server_error" and "pid=" not in event["error"]["message"]
        assert "error" in seen
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


def test_a_websocket_ended_by_the_server_closes_the_socket(server):
    """The session ending on its side (a hang-up) ends the socket: no ghost on either side."""
    from websockets.exceptions import ConnectionClosed

    with ws_connect(server, [("Authorization", f"Bearer {KEY}")]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        (session_id,) = list(server.websockets.sessions)
        server.run(server.websockets.close(session_id))
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=10)
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


def test_the_largest_bindable_config_still_fits_a_websocket_handshake(server):
    """A bound secret rides in a header line; WebSocket servers refuse lines over 8 KiB."""
    from deployments.auth import MAX_BOUND_CONFIG_CHARS

    size = MAX_BOUND_CONFIG_CHARS * 3 // 4 - 64
    token = secret(server, {"session": {"type": "realtime", "instructions": "x" * size}})
    assert len(token) > MAX_BOUND_CONFIG_CHARS - 200
    for headers, protocols in (([("Authorization", f"Bearer {token}")], None), ([], ["realtime", f"openai-insecure-api-key.{token}"])):
        with ws_connect(server, headers, subprotocols=protocols) as ws:
            assert json.loads(ws.recv(timeout=10))["session"]["instructions"] == "x" * size
    wait_for(lambda: server.sessions() == 0, message=server.sessions)
