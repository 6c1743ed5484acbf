"""`Remote`: a Ray actor handle as an async port.

`await Remote(handle).join(session_id)` is `await handle.join.remote(session_id)`, and a
`ProtocolError` raised inside the actor comes out as itself, not wrapped in a `RayTaskError`, so
code written against a port (`protocols.ports`) runs unchanged in process or across actors.
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


class Remote:
    def __init__(self, handle: Any):
        self.handle = handle

    def __getattr__(self, name: str):
        method = getattr(self.handle, name)

        async def call(*args, **kwargs):
            return await call_remote(method, *args, **kwargs)

        call.__name__ = name
        return call

    def __reduce__(self):
        return Remote, (self.handle,)
