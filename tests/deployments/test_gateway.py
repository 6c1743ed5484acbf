"""The HTTP routes of `deployments.gateway`, served in process (`tests.deployments.edge_server`)
and driven by real clients and raw sockets.

Each hostile input here was once a 500, a leak or a hang: a non-ASCII Authorization header, a
deeply nested JSON body, a trickled body, a bad session config.
"""

import json
import socket
import time

import httpx
import pytest

from tests.waits import wait_for

from .edge_server import KEY, _upgrade, assert_clean_error, bearer, offer, secret, server  # noqa: F401 (offer, server: fixtures)

pytestmark = pytest.mark.timeout(120)


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
