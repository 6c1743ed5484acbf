"""The HTTP edge of the running application (real Ray, Serve's proxy, the actors) against a
hostile client: what once answered 500, leaked internals, held a connection or a slot, and the
fuzz properties of test_gateway_fuzz.py beside a real call."""

import asyncio
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import ray

from protocols import OutputChunk, from_table
from tests.conftest import API_KEY
from tests.deployments.edge_server import INTERNALS, _frame, _upgrade, offer  # noqa: F401 (offer: a fixture)
from tests.deployments.test_gateway_fuzz import PROPERTIES, Target
from tests.waits import wait_for

pytestmark = pytest.mark.timeout(600)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def clean_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["code"] and error["message"] and "\n" not in error["message"] and len(error["message"]) <= 200
    assert not any(bad in response.text for bad in INTERNALS), response.text
    return error


def sessions(app) -> int:
    return ray.get(app.ingress.stats.remote())["sessions"] + ray.get(app.interaction.stats.remote()).sessions


def until_taken(attempt, timeout=90.0):
    """`attempt()` again while the app answers 503 "capacity" (an interaction actor on a busy
    machine refuses new sessions while its steps run hot); its last answer."""
    deadline = time.time() + timeout
    while True:
        result = attempt()
        status = getattr(result, "status_code", None)
        if status != 503 or time.time() > deadline:
            return result
        time.sleep(1.0)  # as its Retry-After says


def mint(app_url, body=None) -> str:
    response = httpx.post(f"{app_url}/v1/realtime/client_secrets", json=body or {}, headers=bearer(API_KEY))
    assert response.status_code == 200, response.text
    return response.json()["value"]


def test_non_ascii_authorization_is_401_on_every_route(app, app_url, offer):
    for value in ("Bearer sk-\u00e9", "Bearer \u4f60\u597d", "\u00ff"):
        raw = [(b"authorization", value.encode())]
        clean_error(httpx.post(f"{app_url}/v1/realtime/calls", content=offer, headers=raw + [(b"content-type", b"application/sdp")]), 401)
        clean_error(httpx.post(f"{app_url}/v1/realtime/calls/x/hangup", headers=raw), 401)
        clean_error(httpx.post(f"{app_url}/v1/realtime/client_secrets", content=b"{}", headers=raw), 401)
        port = int(app_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(_upgrade(port, value.encode()))
            status = sock.recv(4096).split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 4"), status  # refused (401, or 403 where the proxy hides the status)


def test_deep_json_is_400_invalid_json(app_url, offer):
    body = b"[" * 8000 + b"]" * 8000
    assert clean_error(httpx.post(f"{app_url}/v1/realtime/client_secrets", content=body, headers=bearer(API_KEY)), 400)["code"] == "invalid_json"
    files = {"sdp": (None, offer), "session": (None, '{"a":' * 5000 + "1" + "}" * 5000)}
    assert clean_error(httpx.post(f"{app_url}/v1/realtime/calls", files=files, headers=bearer(API_KEY)), 400)["code"] == "invalid_json"


@pytest.mark.parametrize("session", [[], {"audio": {"input": {"format": {"type": "audio/pcm", "rate": "fast"}}}}, {"tools": "all of them"}])
def test_a_bad_session_config_answers_without_internals(app, app_url, offer, session):
    files = {"sdp": (None, offer), "session": (None, json.dumps(session))}
    for reply in (
        httpx.post(f"{app_url}/v1/realtime/calls", files=files, headers=bearer(API_KEY)),
        httpx.post(f"{app_url}/v1/realtime/client_secrets", json={"session": session}, headers=bearer(API_KEY)),
    ):
        assert reply.status_code == 400, reply.text
        clean_error(reply, 400)


def test_a_trickled_body_is_408_at_the_deadline(app, app_url):
    """1 byte every 0.5 s of a 1000-byte offer: the edge answers at its deadline (10 s by default)."""
    port = int(app_url.rsplit(":", 1)[1])
    timeout_s = app.config.limits.body_timeout_s
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/realtime/calls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/sdp\r\nContent-Length: 1000\r\n\r\n".encode())
        sock.settimeout(0.5)
        sent, reply, started = 0, b"", time.time()
        while sent < 1000 and not reply and time.time() - started < 6 * timeout_s:
            try:
                sock.sendall(b"v")
                sent += 1
                reply = sock.recv(65536)
            except socket.timeout:
                continue
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert sent < 1000


def test_a_secret_binds_its_config_to_the_call(app, app_url, speech_wav):
    from examples.call import call, read_wav

    token = mint(app_url, {"session": {"type": "realtime", "instructions": "a bound instruction"}, "expires_after": {"anchor": "created_at", "seconds": 60}})
    samples, rate = read_wav(speech_wav)
    report = asyncio.run(call(app_url, samples[: rate // 2], rate, api_key=token, tail_s=0.3))
    created = next(e for e in report.events if e["type"] == "session.created")
    assert created["session"]["instructions"] == "a bound instruction"


def test_a_call_belongs_to_whoever_made_it(app, app_url, offer):
    calls = f"{app_url}/v1/realtime/calls"
    alice, mallory = mint(app_url), mint(app_url)
    response = until_taken(lambda: httpx.post(calls, content=offer, headers={**bearer(alice), "Content-Type": "application/sdp"}))
    assert response.status_code == 201, response.text
    hangup = app_url + response.headers["location"] + "/hangup"
    assert clean_error(httpx.post(hangup, headers=bearer(mallory)), 403)["code"] == "forbidden"
    assert httpx.post(hangup, headers=bearer(alice)).status_code == 200
    clean_error(httpx.post(hangup, headers=bearer(alice)), 404)
    response = until_taken(lambda: httpx.post(calls, content=offer, headers={**bearer(alice), "Content-Type": "application/sdp"}))
    assert httpx.post(app_url + response.headers["location"] + "/hangup", headers=bearer(API_KEY)).status_code == 200


def test_dropped_websocket_handshakes_leak_no_session(app, app_url):
    """Through Serve's proxy: clients that drop right after the upgrade, or mid-frame, leave no
    session behind on the interaction side, and a new caller gets in."""
    port = int(app_url.rsplit(":", 1)[1])
    before = ray.get(app.interaction.stats.remote()).sessions
    for i in range(40):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        try:
            sock.sendall(_upgrade(port, f"Bearer {API_KEY}".encode()))
            if i % 4 >= 2:
                sock.recv(4096)
                sock.sendall(_frame(b'{"type": "input_audio_buffer.append", "audio": "AAAA"}')[:4])
        except OSError:
            pass
        sock.close()
    wait_for(lambda: ray.get(app.interaction.stats.remote()).sessions == before, interval=0.1)
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    deadline = time.time() + 90
    while True:
        try:
            with connect(app_url.replace("http", "ws") + "/v1/realtime", additional_headers=bearer(API_KEY), open_timeout=20) as ws:
                assert json.loads(ws.recv(timeout=20))["type"] == "session.created"
            break
        except InvalidStatus as exc:  # 503 "capacity" while the machine runs hot; never a leak
            assert exc.response.status_code == 503 and time.time() < deadline, exc
            time.sleep(1.0)


class GoodCall(threading.Thread):
    """A real WebRTC call (the example client) running beside the fuzzer."""

    def __init__(self, app_url, samples, rate):
        super().__init__(daemon=True)
        self.args, self.report, self.error = (app_url, samples, rate), None, None

    def run(self):
        from examples.call import call

        deadline = time.time() + 90
        while True:
            try:
                self.report = asyncio.run(call(*self.args, api_key=API_KEY, tail_s=0.5, send_events=[{"type": "response.create"}]))
                return
            except RuntimeError as exc:  # refused with 503 "capacity" while the machine runs hot: call again
                if "HTTP 503" not in str(exc) or time.time() > deadline:
                    self.error = exc
                    return
                time.sleep(1.0)
            except Exception as exc:
                self.error = exc
                return


@pytest.mark.parametrize("prop", PROPERTIES, ids=[p.__name__ for p in PROPERTIES])
def test_fuzz_against_the_app(app, app_url, offer, speech_wav, prop):
    from examples.call import read_wav

    samples, rate = read_wav(speech_wav)
    wait_for(lambda: sessions(app) == 0, interval=0.1)
    good = GoodCall(app_url, np.tile(samples, 2), rate)
    good.start()
    prop(Target(app_url, API_KEY, lambda: sessions(app), offer))
    good.join(120)
    assert good.error is None, good.error
    report = good.report
    assert report.event_types().get("session.created") == 1 and "error" not in report.event_types()
    # it went on while the fuzzer ran: the caller was sent most ticks its session was stepped
    token = next(e for e in report.events if e["type"] == "session.created")["session"]["interplay"]["log_token"]
    stepped = sum(1 for d in from_table(ray.get(app.log.read.remote(report.session_id, token))) if isinstance(d, OutputChunk))
    assert stepped > 0 and len(report.ticks) >= 0.5 * stepped and len(report.received) > 0, (len(report.ticks), stepped)
    wait_for(lambda: sessions(app) == 0, interval=0.1)
