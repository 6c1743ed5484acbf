"""Property-based fuzzing of every HTTP route's bodies, headers and SDP offers.

Invariants, whatever comes in: no 5xx (but 503 "capacity", the honest answer of a full or
overloaded interaction side, which a busy machine may give any new call), every error is JSON `{"error": {"code", "message"}}` with no
internals in it, no slot leaks (sessions are back to where they were), and a good caller beside
the fuzzer is unaffected. The properties take a `Target` (a URL, a key, a session count), so the
same ones run here against the in-process edge and in test_edges_http.py against the real app.
"""

import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

import httpx
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from tests.deployments.edge_server import INTERNALS, KEY, Server, _upgrade
from tests.waits import wait_for
from tests.deployments.edge_server import offer as offer  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(600)

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)


@dataclass
class Target:
    url: str
    key: str
    sessions: Callable[[], int]  # live sessions on the server side, to check none leaked
    offer: str

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port


# --- strategies ------------------------------------------------------------------------------------

header_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=300).map(str.strip)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=24)


@st.composite
def deep_json(draw) -> str:
    """Nesting far past any sane depth, as arrays, objects or both, sometimes under a real key."""
    n = draw(st.integers(1, 4000))
    kind = draw(st.sampled_from(["array", "object", "mixed"]))
    if kind == "array":
        body = "[" * n + "]" * n
    elif kind == "object":
        body = '{"a":' * n + "1" + "}" * n
    else:
        body = '[{"a":' * (n // 2) + "1" + "}]" * (n // 2)
    key = draw(st.sampled_from(["", "session", "expires_after"]))
    return json.dumps({key: "X"}).replace('"X"', body) if key else body


session_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["realtime", "transcription"]) | st.text(max_size=10),
        "instructions": st.text(max_size=200),
        "audio": json_values,
        "interplay": json_values,
        "tools": json_values,
        "model": st.text(max_size=20),
    },
)
secret_bodies = st.one_of(
    json_values.map(json.dumps),
    deep_json(),
    st.fixed_dictionaries({}, optional={
        "session": session_like | json_values,
        "expires_after": st.fixed_dictionaries({}, optional={"anchor": st.sampled_from(["created_at", "later"]) | json_values, "seconds": st.integers(-10, 10**12) | json_values}),
    }).map(json.dumps),
    st.binary(max_size=500).map(lambda b: b.decode("latin-1")),
)
content_types = st.sampled_from([
    "application/sdp", "text/plain", "", "application/json", "multipart/form-data; boundary=b", "multipart/form-data",
    "application/x-www-form-urlencoded", "image/png", "application/sdp; charset=utf-16", "text/plain; charset=latin-1",
]) | header_text


@st.composite
def mutated_offer(draw, sdp: str) -> bytes:
    """A real offer, damaged: lines dropped, doubled, swapped or replaced, cut short, bytes flipped."""
    lines = sdp.split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "double", "swap", "replace", "truncate", "flip", "insert"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "double":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "replace":
            lines[i] = draw(st.text(max_size=80))
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(["m=audio 9 UDP/TLS/RTP/SAVPF 111", "m=video 9 UDP/TLS/RTP/SAVPF 96", "a=candidate:1 1 UDP 1 10.0.0.1 9 typ host", "c=IN IP4 999.1.1.1", "a=fingerprint:sha-256 ZZ", "a=rtpmap:111 opus/0/2", "m=application 0 x"])))
    data = "\r\n".join(lines).encode()
    if draw(st.booleans()):
        k = draw(st.integers(0, len(data) - 1))
        data = data[:k] + bytes([draw(st.integers(0, 255))]) + data[k + 1:]
    return data


# --- invariants ------------------------------------------------------------------------------------


def check(response: httpx.Response) -> None:
    """No 5xx but a 503 "capacity" (a full or overloaded interaction side refuses new calls: a
    busy machine's honest answer); errors in the JSON shape, one clean sentence."""
    if response.status_code >= 500:
        assert response.status_code == 503 and response.json()["error"]["code"] == "capacity", (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str) and error["message"]
        assert "\n" not in error["message"] and len(error["message"]) <= 200
        assert not any(bad in response.text for bad in INTERNALS), response.text[:300]


def post(target: Target, path: str, body: bytes = b"", headers: list | None = None) -> httpx.Response:
    try:
        return httpx.post(target.url + path, content=body, headers=headers or [], timeout=60)
    except httpx.LocalProtocolError:
        reject()  # the client would not send it: nothing reached the server


def hang_up(target: Target, response: httpx.Response) -> None:
    if response.status_code == 201:
        assert httpx.post(target.url + response.headers["location"] + "/hangup", headers={"Authorization": f"Bearer {target.key}"}).status_code == 200


def auth(target: Target) -> list:
    return [(b"authorization", f"Bearer {target.key}".encode())]


# --- properties ------------------------------------------------------------------------------------


def fuzz_call_bodies(target: Target):
    @FUZZ
    @given(body=st.binary(max_size=3000) | deep_json().map(str.encode), kind=content_types)
    def prop(body, kind):
        response = post(target, "/v1/realtime/calls", body, auth(target) + [(b"content-type", kind.encode())])
        check(response)
        hang_up(target, response)

    prop()


def fuzz_offers(target: Target):
    @FUZZ
    @given(data=st.data(), multipart=st.booleans(), session=st.none() | session_like.map(json.dumps) | deep_json() | json_values.map(json.dumps))
    def prop(data, multipart, session):
        sdp = data.draw(mutated_offer(target.offer))
        if multipart:
            files = {"sdp": (None, sdp)}
            if session is not None:
                files["session"] = (None, session)
            try:
                response = httpx.post(target.url + "/v1/realtime/calls", files=files, headers={"Authorization": f"Bearer {target.key}"}, timeout=60)
            except httpx.LocalProtocolError:
                reject()
        else:
            response = post(target, "/v1/realtime/calls", sdp, auth(target) + [(b"content-type", b"application/sdp")])
        check(response)
        hang_up(target, response)

    prop()


def fuzz_secret_bodies(target: Target):
    @FUZZ
    @given(body=secret_bodies, kind=st.sampled_from(["application/json", "", "text/plain"]) | header_text)
    def prop(body, kind):
        response = post(target, "/v1/realtime/client_secrets", body.encode("utf-8", "surrogatepass"), auth(target) + [(b"content-type", kind.encode())])
        check(response)
        if response.status_code == 200:
            assert response.json()["value"].startswith("ek_")

    prop()


def fuzz_credentials(target: Target):
    """Any Authorization value on any route: 401 (or the route's own answer to a good one)."""
    huge = st.integers(1000, 30_000).map(lambda n: "Bearer " + "\u00e9" * (n // 2))
    value = header_text | huge | st.binary(max_size=200).map(lambda b: "Bearer " + b.decode("latin-1")) | st.sampled_from(["Bearer ek_1.2.3", "Bearer ek_9999999999.a.b.c", "Bearer ek_....", "bearer  "])

    @FUZZ
    @given(value=value, route=st.sampled_from(["calls", "hangup", "secrets", "websocket"]), encoding=st.sampled_from(["utf-8", "latin-1"]))
    def prop(value, route, encoding):
        raw = value.encode(encoding, "replace")
        raw = bytes(b for b in raw if b >= 0x20 and b != 0x7F).strip()
        if route == "websocket":
            if len(raw) < 7000:  # longer header lines are refused by the WebSocket library, before the app
                status = _ws_status(target.port, raw)
                assert status.startswith(b"HTTP/1.1 ") and not status.startswith(b"HTTP/1.1 5"), status
            return
        path, body, kind = {
            "calls": ("/v1/realtime/calls", target.offer.encode(), b"application/sdp"),
            "hangup": ("/v1/realtime/calls/nope/hangup", b"", b"text/plain"),
            "secrets": ("/v1/realtime/client_secrets", b"{}", b"application/json"),
        }[route]
        response = post(target, path, body, [(b"authorization", raw), (b"content-type", kind)])
        check(response)
        assert response.status_code in (401, 404), response.status_code  # the key is never guessed

    prop()


def fuzz_hangup_ids(target: Target):
    @FUZZ
    @given(call_id=st.text(min_size=1, max_size=3000))
    def prop(call_id):
        path = "/v1/realtime/calls/" + urllib.parse.quote(call_id, safe="") + "/hangup"
        check(post(target, path, b"", auth(target)))

    prop()


def _ws_status(port: int, authorization: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_upgrade(port, authorization))
        reply = b""
        while b"\r\n" not in reply:
            more = sock.recv(4096)
            if not more:
                break
            reply += more
    return reply.split(b"\r\n", 1)[0]


PROPERTIES = [fuzz_call_bodies, fuzz_offers, fuzz_secret_bodies, fuzz_credentials, fuzz_hangup_ids]


# --- in process ------------------------------------------------------------------------------------


class Caller(threading.Thread):
    """A good WebSocket caller kept busy beside the fuzzer: it appends audio and asks for
    session updates, and records what it hears back."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.stop, self.events, self.error = server, threading.Event(), [], None

    def run(self):
        from websockets.sync.client import connect

        try:
            with connect(f"ws://127.0.0.1:{self.server.port}/v1/realtime", additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": f"turn {n}"}}))
                    deadline = time.time() + 0.3  # an update every 0.3 s, reading what comes meanwhile
                    while time.time() < deadline:
                        try:
                            self.events.append(json.loads(ws.recv(timeout=0.1))["type"])
                        except TimeoutError:
                            pass
        except Exception as exc:  # recorded: the test asserts there is none
            self.error = exc


@pytest.fixture(scope="module")
def target(offer):
    server = Server()
    yield Target(server.url, KEY, lambda: len(server.calls.sessions) + len(server.websockets.sessions), offer), server
    server.stop()


@pytest.mark.parametrize("prop", PROPERTIES, ids=[p.__name__ for p in PROPERTIES])
def test_fuzz_in_process(target, prop):
    target, server = target
    before = target.sessions()
    caller = Caller(server)
    caller.start()
    wait_for(lambda: "session.created" in caller.events)
    prop(target)
    updated = caller.events.count("session.updated")
    wait_for(lambda: caller.events.count("session.updated") > updated)  # still answered after the fuzzing
    caller.stop.set()
    caller.join(10)
    assert caller.error is None, caller.error
    assert "error" not in caller.events
    wait_for(lambda: target.sessions() == before)
    response = httpx.post(target.url + "/v1/realtime/calls", content=target.offer, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/sdp"})
    assert response.status_code == 201  # a good call still gets in
    hang_up(target, response)
    wait_for(lambda: target.sessions() == before)
