"""`Remote`: a Ray actor handle as the async port it stands for.

`await Remote(handle, Interaction).join(session_id)` is `await handle.join.remote(session_id)`,
and a `ProtocolError` raised inside the actor comes out as itself, not wrapped in a
`RayTaskError`, so code written against a port (`protocols.ports`) runs unchanged in process or
across actors. A `Remote` answers only the methods its port declares: any other name (a typo, a
method of another port) raises AttributeError at once, naming the port, and a runtime
`isinstance` check against a port sees what it declares.
"""

from __future__ import annotations

from typing import Any, TypeVar

import ray
from ray.actor import ActorClass
from ray.exceptions import RayTaskError

from protocols import ProtocolError


T = TypeVar("T")


def actor_class(cls: type[T], **options: Any) -> ActorClass[T]:
    """`ray.remote(**options)(cls)`: the typed overload of `ray.remote` lists task options only
    (no `max_concurrency`), so the options go through untyped here, once."""
    remote: Any = ray.remote
    return remote(**options)(cls)


async def call_remote(method: Any, *args, **kwargs) -> Any:
    """`await method.remote(*args, **kwargs)`, a ProtocolError raised in the actor coming out as
    itself: the one place Ray's error wrapping is undone."""
    try:
        return await method.remote(*args, **kwargs)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, ProtocolError):
            raise ProtocolError(str(cause), cause.code, cause.param) from None
        raise


def declared(port: type) -> frozenset[str]:
    """The public methods a port (a `typing.Protocol` class) declares, its bases' included."""
    names = set()
    for cls in port.__mro__:
        if cls.__module__ in ("typing", "builtins"):
            continue
        names |= {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}
    return frozenset(names)


class Remote:
    """`handle`'s methods that `port` declares, each an awaitable call through `call_remote`.
    Crosses processes as itself (the handle and the port)."""

    def __init__(self, handle: Any, port: type):
        self.handle = handle
        self.port = port
        self.methods = declared(port)

    def __getattr__(self, name: str):
        # Read through __dict__: during unpickling or copying nothing is set yet.
        if name not in self.__dict__.get("methods", ()):
            port = self.__dict__.get("port")
            raise AttributeError(f"the {getattr(port, '__name__', 'unbound')} port declares no method {name!r}")
        method = getattr(self.handle, name)

        async def call(*args, **kwargs):
            return await call_remote(method, *args, **kwargs)

        call.__name__ = name
        return call

    def __reduce__(self):
        return Remote, (self.handle, self.port)

    def __repr__(self) -> str:
        return f"Remote({self.handle!r}, {self.port.__name__})"
