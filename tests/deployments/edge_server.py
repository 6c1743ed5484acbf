"""The HTTP and WebSocket edge in process, for the tests of `deployments.gateway`,
`deployments.websocket` and `deployments.errors` (and test_caller_limits.py, test_gateway_fuzz.py,
test_edges_http.py): `Edge` over real in-process `Ingress`es and a fake interaction side, served by
uvicorn on loopback (no Ray), with the fixtures and client helpers those tests share.
"""

import asyncio
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
from protocols import OutputChunk, TickClock
from protocols.seams import Joined

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


def ws_connect(server, headers, **kwargs):
    from websockets.sync.client import connect

    return connect(f"ws://127.0.0.1:{server.port}/v1/realtime", additional_headers=headers, open_timeout=10, **kwargs)


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
