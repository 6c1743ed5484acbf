"""The HTTP and WebSocket edge in process: `Edge` over real in-process `Ingress`es and a fake
interaction side, served by uvicorn on loopback (no Ray), driven by real clients and raw sockets.

Each hostile input here was once a 500, a leak or a hang: a non-ASCII Authorization header, a
deeply nested JSON body, internals in error messages, a trickled body, a WebSocket handshake
dropped after it was accepted, an exception while handling a client message.
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from actors.ingress.ingress import Ingress
from actors.interaction.placement import Direct
from deployments.auth import Auth
from deployments.config import AppConfig
from deployments.gateway import Edge, make_api
from protocols import OutputChunk, ProtocolError, TickClock
from protocols.seams import Joined
from tests.waits import wait_for

pytestmark = pytest.mark.timeout(120)

KEY = "sk-edge"
INTERNALS = ("Traceback", "pid=", "/work/", 'File "', "ip=", "errors.pydantic.dev", "RayTaskError")


class Fake:
    """The interaction side in process: joins take a moment (so a handshake can drop mid-join),
    every session hears its input back."""

    def __init__(self):
        self.members: set[str] = set()

    async def clock_info(self):
        return {"t0": 0.0, "tick_ms": 200, "tick_s": 0.2, "grace_s": 0.04}

    async def join(self, session_id, seed=None):
        await asyncio.sleep(0.01)
        self.members.add(session_id)
        return Joined(session_id, 0, f"token-{session_id}", {})

    async def leave(self, session_id):
        self.members.discard(session_id)

    async def exchange(self, tick, chunks, session_ids):
        return [OutputChunk(c.session_id, c.seq, c.t_start, c.audio, text="la ", controls=["speak"]) for c in chunks]

    async def stats(self):
        return {"sessions": len(self.members), "tick": 0, "step_ms_p50": 0.0, "step_ms_p99": 0.0, "late_chunks": 0, "missing_chunks": 0, "totals": {}}


class Server:
    """An `Edge` served by uvicorn on a loopback port, on its own thread and event loop."""

    def __init__(self, **config):
        self.config = AppConfig.model_validate({"auth": {"api_keys": [KEY]}, **config})
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the server did not start"

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self.interaction = Fake()
        clock = TickClock(time.time())
        # One placement for calls and WebSockets alike, as the router is for the deployment.
        placement = Direct(self.interaction, sessions_per_tenant=self.config.limits.sessions_per_key)
        self.calls = Ingress(placement, clock, max_sessions=16)
        self.websockets = Ingress(placement, clock, max_sessions=16)
        auth = Auth(self.config.auth.keys(), b"signing-key", self.config.auth.client_secret_ttl_s)
        self.edge = Edge(self.config, auth, self.interaction, self.calls, self.websockets)
        server = uvicorn.Server(uvicorn.Config(make_api(self.edge), log_level="warning", lifespan="off"))
        server.install_signal_handlers = lambda: None
        self.server = server
        serving = asyncio.create_task(server.serve(sockets=[self.sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        self.ready.set()
        await serving
        for ingress in (self.calls, self.websockets):
            await ingress.shutdown()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sessions(self) -> int:
        return len(self.calls.sessions) + len(self.websockets.sessions) + len(self.interaction.members)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = Server(limits={"body_timeout_s": 1.0})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offer() -> str:
    """A real browser-like SDP offer (audio and the data channel), made once by aiortc."""
    from aiortc import RTCPeerConnection

    async def make():
        pc = RTCPeerConnection()
        pc.addTransceiver("audio", direction="sendrecv")
        pc.createDataChannel("oai-events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_clean_error(response, status=None):
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.text)
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    assert "\n" not in error["message"] and len(error["message"]) <= 200
    assert not any(bad in response.text for bad in INTERNALS), response.text
    return error


def secret(server, body=None) -> str:
    response = httpx.post(f"{server.url}/v1/realtime/client_secrets", json=body or {}, headers=bearer(KEY))
    assert response.status_code == 200, response.text
    return response.json()["value"]


# --- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Bearer sk-\u00e9\u00e9", "Bearer \u4f60\u597d", "\u00e9", "Bearer ek_\u00ff.1.2", "Bearer " + "\u00e9" * 5000])
def test_a_non_ascii_authorization_header_is_401_on_every_route(server, offer, value):
    raw = [(b"authorization", value.encode("utf-8"))]
    routes = [
        ("/v1/realtime/calls", offer.encode(), "application/sdp"),
        ("/v1/realtime/calls/some-call/hangup", b"", None),
        ("/v1/realtime/client_secrets", b"{}", "application/json"),
    ]
    for path, body, kind in routes:
        headers = raw + ([(b"content-type", kind.encode())] if kind else [])
        assert_clean_error(httpx.post(server.url + path, content=body, headers=headers), 401)
    if len(value.encode()) < 8000:  # longer header lines get no answer from the WebSocket server library at all
        assert b" 401 " in ws_status(server.port, value.encode("utf-8"))
    assert server.sessions() == 0


def ws_connect(server, headers, **kwargs):
    from websockets.sync.client import connect

    return connect(f"ws://127.0.0.1:{server.port}/v1/realtime", additional_headers=headers, open_timeout=10, **kwargs)


def ws_status(port: int, authorization: bytes) -> bytes:
    """The status line a raw WebSocket upgrade with this Authorization value gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(_upgrade(port, authorization))
        reply = b""
        while b"\r\n" not in reply:
            more = sock.recv(4096)
            if not more:
                break
            reply += more
    return reply.split(b"\r\n", 1)[0]


# --- bodies --------------------------------------------------------------------------------------


def test_deeply_nested_json_is_400_invalid_json(server, offer):
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep[:16000], b'{"a":' * 2000 + b"1" + b"}" * 2000):
        error = assert_clean_error(httpx.post(f"{server.url}/v1/realtime/client_secrets", content=body, headers=bearer(KEY)), 400)
        assert error["code"] == "invalid_json"
    files = {"sdp": (None, offer), "session": (None, "[" * 20000 + "]" * 20000)}
    error = assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", files=files, headers=bearer(KEY)), 400)
    assert error["code"] == "invalid_json"
    assert server.sessions() == 0


def test_a_body_over_its_cap_is_413_even_without_a_length(server, offer):
    big = b"v=0\r\n" + b"a=x\r\n" * 20_000
    assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", content=big, headers={**bearer(KEY), "Content-Type": "application/sdp"}), 413)

    def chunks():  # chunked: no Content-Length to refuse it by
        for _ in range(100):
            yield b"a=x\r\n" * 200

    assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", content=chunks(), headers={**bearer(KEY), "Content-Type": "application/sdp"}), 413)
    assert_clean_error(httpx.post(f"{server.url}/v1/realtime/client_secrets", content=b" " * 17_000, headers=bearer(KEY)), 413)


@pytest.mark.parametrize("path", ["/v1/realtime/calls", "/v1/realtime/client_secrets"])
def test_a_trickled_body_is_cut_off_at_the_deadline(server, path):
    """1 byte every 0.2 s of a 200-byte body: answered 408 well before it is all in (the
    server's deadline is 1 s here; the test allows far more)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/sdp\r\nContent-Length: 200\r\n\r\n".encode())
        sock.settimeout(0.2)
        sent, reply = 0, b""
        while sent < 200 and not reply:
            try:
                sock.sendall(b"v")
                sent += 1
                reply = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
        sock.settimeout(10)
        while b"\r\n\r\n" not in reply:
            more = sock.recv(65536)
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert sent < 200


def test_wrong_content_types_and_non_utf8_offers_are_400(server):
    for kind, body in [("application/json", b"{}"), ("image/png", b"\x89PNG"), ("application/sdp", b"\xff\xfe v=0"), ("multipart/form-data; boundary=x", b"--x\r\ngarbage")]:
        assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", content=body, headers={**bearer(KEY), "Content-Type": kind}), 400)


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    assert assert_clean_error(httpx.get(f"{server.url}/nothing"), 404)["code"] == "not_found"
    assert assert_clean_error(httpx.get(f"{server.url}/v1/realtime/calls"), 405)["code"] == "method_not_allowed"
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"


# --- internals never reach a client --------------------------------------------------------------


def test_errors_from_the_ingress_carry_no_internals(server, offer, monkeypatch):
    """A ProtocolError's first line only, capped; anything else is 503 with a generic message."""
    leaky = ProtocolError("bad offer\nTraceback (most recent call last):\n  File \"/work/main/x.py\", line 1 (pid=123, ip=10.0.0.1)", "invalid_sdp")

    async def raises_protocol(*args, **kwargs):
        raise leaky

    async def raises_other(*args, **kwargs):
        raise RuntimeError("ray::IngressActor.offer() (pid=4242, ip=10.1.2.3)\n  File \"/work/main/actors/ingress/ingress.py\"")

    headers = {**bearer(KEY), "Content-Type": "application/sdp"}
    monkeypatch.setattr(server.calls, "offer", raises_protocol)
    error = assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", content=offer, headers=headers), 400)
    assert error["message"] == "bad offer"
    monkeypatch.setattr(server.calls, "offer", raises_other)
    assert assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", content=offer, headers=headers), 503)["code"] == "unavailable"
    monkeypatch.setattr(server.calls, "close", raises_other)
    assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls/x/hangup", headers=bearer(KEY)), 503)
    monkeypatch.setattr(server.interaction, "stats", raises_other)
    assert_clean_error(httpx.get(f"{server.url}/healthz"), 503)
    assert_clean_error(httpx.get(f"{server.url}/metrics"), 503)


def test_a_ray_task_error_posing_as_a_protocol_error_shows_only_its_cause():
    """Ray raises an actor's exception as a class deriving from both RayTaskError and the cause:
    its message is a traceback whose first line names the process."""
    from ray.exceptions import RayTaskError

    from deployments.gateway import clean, protocol_error

    cause = ProtocolError("this ingress is full (16 calls)", "capacity")
    wrapped = RayTaskError("IngressActor.offer", "Traceback (most recent call last):\n  File \"/work/main/x.py\"", cause, pid=7, ip="10.0.0.1").as_instanceof_cause()
    assert isinstance(wrapped, ProtocolError) and "pid=" in str(wrapped).split("\n")[0]
    response = protocol_error(wrapped)
    assert response.status_code == 503 and json.loads(response.body)["error"]["message"] == "this ingress is full (16 calls)"
    assert response.headers["retry-after"] == "1"  # a client knows when to try again
    assert clean("ray::IngressActor.offer() (pid=7, ip=10.0.0.1)") == "invalid request"


@pytest.mark.parametrize("session", [[], "text", {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "fast"}}}}, {"type": "transcription"}])
def test_a_bad_session_config_is_one_clean_sentence(server, offer, session):
    files = {"sdp": (None, offer), "session": (None, json.dumps(session))}
    error = assert_clean_error(httpx.post(f"{server.url}/v1/realtime/calls", files=files, headers=bearer(KEY)), 400)
    assert error["param"] == "session"
    error = assert_clean_error(httpx.post(f"{server.url}/v1/realtime/client_secrets", json={"session": session}, headers=bearer(KEY)), 400)
    assert server.sessions() == 0


# --- client secrets ------------------------------------------------------------------------------


def test_client_secrets_take_the_realtime_apis_shape_and_nothing_else(server):
    url = f"{server.url}/v1/realtime/client_secrets"
    before = int(time.time())
    ok = httpx.post(url, json={"expires_after": {"anchor": "created_at", "seconds": 120}, "session": {"type": "realtime", "instructions": "be brief"}}, headers=bearer(KEY))
    after = int(time.time())
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["value"].startswith("ek_") and before + 120 <= body["expires_at"] <= after + 120  # 120 s from when it was made
    assert body["session"] == {"type": "realtime", "instructions": "be brief"}
    capped = httpx.post(url, json={"expires_after": {"anchor": "created_at", "seconds": 10**9}}, headers=bearer(KEY)).json()
    assert capped["expires_at"] <= int(time.time()) + server.config.limits.max_secret_ttl_s
    for bad in ([1, 2], "x", {"unknown": 1}, {"expires_after": {"anchor": "later", "seconds": 60}}, {"expires_after": {"seconds": 1}}, {"session": {"type": "realtime", "instructions": "x" * 9000}}):
        assert_clean_error(httpx.post(url, json=bad, headers=bearer(KEY)), 400)
    assert httpx.post(url, headers=bearer(KEY)).status_code == 200  # no body: a default secret


def test_a_secret_carries_its_config_to_the_call_and_an_offer_may_not_differ(server, offer, monkeypatch):
    seen = []
    real_offer = server.calls.offer

    async def spy(sdp, config=None, owner=None, **quota):
        seen.append(config)
        return await real_offer(sdp, config, owner=owner, **quota)

    monkeypatch.setattr(server.calls, "offer", spy)
    bound = {"type": "realtime", "instructions": "speak like a pirate"}
    token = secret(server, {"session": bound})
    url = f"{server.url}/v1/realtime/calls"
    response = httpx.post(url, content=offer, headers={**bearer(token), "Content-Type": "application/sdp"})
    assert response.status_code == 201, response.text
    assert seen[-1] == bound
    httpx.post(server.url + response.headers["location"] + "/hangup", headers=bearer(token))
    other = {"sdp": (None, offer), "session": (None, json.dumps({"type": "realtime", "instructions": "be yourself"}))}
    assert_clean_error(httpx.post(url, files=other, headers=bearer(token)), 400)
    same = {"sdp": (None, offer), "session": (None, json.dumps(bound))}
    response = httpx.post(url, files=same, headers=bearer(token))
    assert response.status_code == 201 and seen[-1] == bound
    httpx.post(server.url + response.headers["location"] + "/hangup", headers=bearer(token))
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


def test_a_websocket_made_with_a_bound_secret_gets_that_config(server):
    token = secret(server, {"session": {"type": "realtime", "instructions": "bound words"}})
    with ws_connect(server, [("Authorization", f"Bearer {token}")]) as ws:
        created = json.loads(ws.recv(timeout=10))
    assert created["type"] == "session.created" and created["session"]["instructions"] == "bound words"
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


# --- who may hang up -----------------------------------------------------------------------------


def test_only_the_calls_maker_or_a_key_holder_may_hang_it_up(server, offer):
    url = f"{server.url}/v1/realtime/calls"
    alice, mallory = secret(server), secret(server)

    def call(token):
        response = httpx.post(url, content=offer, headers={**bearer(token), "Content-Type": "application/sdp"})
        assert response.status_code == 201, response.text
        return server.url + response.headers["location"] + "/hangup"

    hangup = call(alice)
    assert assert_clean_error(httpx.post(hangup, headers=bearer(mallory)), 403)["code"] == "forbidden"
    assert httpx.post(hangup, headers=bearer(alice)).status_code == 200
    assert assert_clean_error(httpx.post(hangup, headers=bearer(alice)), 404)["code"] == "unknown_session"
    assert httpx.post(call(alice), headers=bearer(KEY)).status_code == 200  # a key holder may end any call
    assert_clean_error(httpx.post(f"{url}/{'x' * 5000}/hangup", headers=bearer(KEY)), 404)
    wait_for(lambda: server.sessions() == 0, message=server.sessions)


# --- WebSockets ----------------------------------------------------------------------------------


def _upgrade(port: int, authorization: bytes = f"Bearer {KEY}".encode()) -> bytes:
    return (
        f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ).encode() + b"Authorization: " + authorization + b"\r\n\r\n"


def _frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


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
