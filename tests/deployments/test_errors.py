"""The edge's error shape (`deployments.errors`), through the in-process edge
(`tests.deployments.edge_server`) and alone: internals never reach a client.
"""

import json

import httpx
import pytest

from protocols import ProtocolError

from .edge_server import KEY, assert_clean_error, bearer, offer, server  # noqa: F401 (offer, server: fixtures)

pytestmark = pytest.mark.timeout(120)


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
