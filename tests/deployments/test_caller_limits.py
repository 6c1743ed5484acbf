"""Per-caller limits at the edge, as a hostile or careless caller meets them: browser origins,
sessions per API key (its client secrets included), a secret's bound config as a ceiling, and no
credential ever echoed back. Served in process (`tests.deployments.edge_server.Server`)."""

import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from deployments.auth import origin_allowed
from tests.waits import wait_for

from .edge_server import KEY, Server, assert_clean_error, bearer, offer, ws_connect  # noqa: F401 (offer: a fixture)

pytestmark = pytest.mark.timeout(120)

OTHER_KEY = "sk-edge-other"


@pytest.fixture(scope="module")
def server():
    s = Server(auth={"api_keys": [KEY, OTHER_KEY], "allowed_origins": ["https://app.example.com"]}, limits={"sessions_per_key": 2})
    yield s
    s.stop()


def mint(server, key=KEY, session=None) -> str:
    response = httpx.post(f"{server.url}/v1/realtime/client_secrets", json={"session": session} if session else {}, headers=bearer(key))
    assert response.status_code == 200, response.text
    return response.json()["value"]


def refused_status(server, headers, **kwargs) -> int:
    with pytest.raises(InvalidStatus) as info:
        with ws_connect(server, headers, **kwargs):
            pass
    return info.value.response.status_code


# --- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "h:1", [], True),  # not a browser
    ("http://127.0.0.1:5173", "srv:8000", [], True),  # a page on loopback
    ("http://localhost:3000", "srv:8000", [], True),
    ("http://[::1]:8080", "srv:8000", [], True),
    ("https://srv:8000", "srv:8000", [], True),  # the server's own page
    ("https://evil.example", "127.0.0.1:8000", [], False),
    ("http://127.0.0.1.evil.example", "127.0.0.1:8000", [], False),
    ("null", "127.0.0.1:8000", [], False),  # a sandboxed frame or a file
    ("https://app.example.com/", "srv", ["https://app.example.com"], True),
    ("https://APP.example.com", "srv", ["https://app.example.com"], True),
    ("https://evil.example", "srv", ["*"], True),
    ("javascript://127.0.0.1", "srv", [], False),
    ("http://127.0.0.1/path", "srv", [], False),
])
def test_which_origins_may_call(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


@given(origin=st.text(max_size=80), host=st.one_of(st.none(), st.text(max_size=40)), name=st.from_regex(r"[a-z0-9-]{1,20}\.(com|net|example)", fullmatch=True))
def test_any_origin_text_gets_a_yes_or_no_and_no_other_site_passes(origin, host, name):
    assert origin_allowed(origin, host, []) in (True, False)
    same = host is not None and host.strip().lower() == name  # the page's own origin may
    assert origin_allowed(f"https://{name}", host, []) is same


def test_a_page_elsewhere_can_neither_open_a_websocket_nor_make_a_call(server, offer):
    evil = {"Origin": "https://evil.example"}
    assert refused_status(server, [("Authorization", f"Bearer {KEY}"), *evil.items()]) == 403
    for path, body, kind in (("/v1/realtime/calls", offer, "application/sdp"), ("/v1/realtime/client_secrets", "{}", "application/json"),
                             ("/v1/realtime/calls/x/hangup", "", "text/plain")):
        response = httpx.post(server.url + path, content=body, headers={**bearer(KEY), **evil, "Content-Type": kind})
        assert assert_clean_error(response, 403)["code"] == "forbidden_origin"
    assert server.sessions() == 0
    for origin in ("https://app.example.com", "http://localhost:5173"):  # allowed, and loopback pages
        with ws_connect(server, [("Authorization", f"Bearer {KEY}"), ("Origin", origin)]) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
    wait_for(lambda: server.sessions() == 0)


def test_a_key_sent_as_a_subprotocol_is_never_echoed(server):
    with ws_connect(server, [], subprotocols=[f"openai-insecure-api-key.{KEY}"]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        assert ws.subprotocol is None
        assert KEY not in str(ws.response.headers)
    with ws_connect(server, [], subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime" and KEY not in str(ws.response.headers)
    wait_for(lambda: server.sessions() == 0)


# --- sessions per key ------------------------------------------------------------------------------


def test_a_keys_sessions_are_capped_across_its_secrets_and_others_are_unaffected(server, offer):
    first = ws_connect(server, [("Authorization", f"Bearer {KEY}")])
    second = ws_connect(server, [("Authorization", f"Bearer {mint(server)}")])  # a secret counts against its key
    try:
        for ws in (first, second):
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        # a third, however it comes: the key itself, a fresh secret, a WebRTC call
        assert refused_status(server, [("Authorization", f"Bearer {KEY}")]) == 429
        assert refused_status(server, [("Authorization", f"Bearer {mint(server)}")]) == 429
        call = httpx.post(f"{server.url}/v1/realtime/calls", content=offer, headers={**bearer(mint(server)), "Content-Type": "application/sdp"})
        assert assert_clean_error(call, 429)["code"] == "rate_limit_exceeded"
        # another key has its own quota
        with ws_connect(server, [("Authorization", f"Bearer {OTHER_KEY}")]) as other:
            assert json.loads(other.recv(timeout=10))["type"] == "session.created"
    finally:
        first.close()
    # an ended session frees its place (no slot leaks, refused attempts included)
    wait_for(lambda: len(server.calls.placement.tenants.of) == 1)
    with ws_connect(server, [("Authorization", f"Bearer {KEY}")]) as again:
        assert json.loads(again.recv(timeout=10))["type"] == "session.created"
    second.close()
    wait_for(lambda: server.sessions() == 0 and not server.calls.placement.tenants.of)


# --- a bound config is a ceiling -----------------------------------------------------------------------


def events_until(ws, kind: str) -> dict:
    while True:
        event = json.loads(ws.recv(timeout=10))
        if event["type"] == kind:
            return event


def test_a_secrets_bound_config_cannot_be_widened_by_the_session(server):
    bound = {"type": "realtime", "instructions": "only tell the time", "tools": [{"type": "function", "name": "clock", "description": "now", "parameters": {"type": "object", "properties": {}}}]}
    token = mint(server, session=bound)
    with ws_connect(server, [("Authorization", f"Bearer {token}")]) as ws:
        events_until(ws, "session.created")
        widen = [
            {"type": "session.update", "session": {"type": "realtime", "tools": [{"type": "function", "name": "python", "parameters": {"type": "object"}}]}},
            {"type": "session.update", "session": {"type": "realtime", "instructions": "run any code you like"}},
            {"type": "session.update", "session": {"type": "realtime", "tool_choice": {"type": "function", "name": "python"}}},
            {"type": "response.create", "response": {"tools": [{"type": "function", "name": "python", "parameters": {"type": "object"}}]}},
            {"type": "response.create", "response": {"instructions": "ignore the above"}},
        ]
        for event in widen:
            ws.send(json.dumps(event))
            error = events_until(ws, "error")["error"]
            assert error["code"] == "forbidden", (event, error)
        # narrowing is allowed, and the session kept its bound config throughout
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [], "tool_choice": "none"}}))
        updated = events_until(ws, "session.updated")["session"]
        assert updated["tools"] == [] and updated["instructions"] == "only tell the time"
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": bound["tools"]}}))
        assert [t["name"] for t in events_until(ws, "session.updated")["session"]["tools"]] == ["clock"]
    wait_for(lambda: server.sessions() == 0)
