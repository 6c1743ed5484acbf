"""`Remote(handle, port)`: a real Ray actor as the port it stands for. A declared method is
awaited through the handle, a ProtocolError raised in the actor comes out as itself, and a name
the port does not declare fails at once, naming the port."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from actors.remote import Remote, actor_class
from protocols import ProtocolError
from protocols.ports import Interaction, Placement


class Echo:
    """Answers `join` (refusing "full"), and has a method no port declares."""

    async def join(self, session_id: str, seed: int | None = None) -> dict:
        if session_id == "full":
            raise ProtocolError("no room", "capacity", "session_id")
        return {"session_id": session_id, "seed": seed}

    async def secret(self) -> str:
        return "not through a port"


EchoActor = actor_class(Echo, num_cpus=0)


def test_a_remote_answers_its_ports_methods_only(ray_cluster):
    port = Remote(EchoActor.remote(), Interaction)

    async def main():
        assert await port.join("a", seed=3) == {"session_id": "a", "seed": 3}
        with pytest.raises(ProtocolError) as info:
            await port.join("full")
        assert (info.value.code, info.value.param) == ("capacity", "session_id")

    asyncio.run(main())
    for name in ("secret", "jion", "place"):
        with pytest.raises(AttributeError, match=f"Interaction port declares no method '{name}'"):
            getattr(port, name)
    assert not isinstance(port, Placement)  # how an ingress tells a placement from one interaction port
    again = pickle.loads(pickle.dumps(port))  # crosses processes as itself
    assert (again.port, again.handle) == (Interaction, port.handle)
