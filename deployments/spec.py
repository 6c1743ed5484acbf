"""The vocabulary of the deployment plan (`deployments.plan`): an `ActorSpec` says which actor to
make (role, name, class, arguments, Ray options) and a `Ref` stands, in its arguments, for what
exists only once earlier actors are up (a handle, the clock), filled in by `ActorSpec.resolve`.
How an actor is created (named only, or detached and reused) is its creator's choice, never the
spec's."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, cast

import ray

NAMESPACE = "interplay"


def named_actors() -> list[dict[str, str]]:
    """The named actors of every namespace, as Ray lists them (`name`, `namespace`)."""
    return cast(list[dict[str, str]], ray.util.list_named_actors(all_namespaces=True))


class StartupError(RuntimeError):
    """Interplay cannot start as configured; the message is one line fit for the console."""


@dataclass(frozen=True)
class Ref:
    """What `made[key]` holds when the spec is resolved (an actor's handle by its name, or "clock",
    "t0"), passed through `wrap` (a `Remote` of a port, `RemotePool`) when given."""

    key: str
    wrap: Callable[[Any], Any] | None = None

    def value(self, made: dict[str, Any]) -> Any:
        if self.key not in made:
            raise KeyError(f"the plan refers to {self.key!r} before it is made")
        found = made[self.key]
        return self.wrap(found) if self.wrap is not None else found


class Resolves:
    """An argument in a plan that holds `Ref`s of its own (an `ActorSpec`, an `InteractionFleet`):
    `resolve(made)` gives it with them filled in."""

    def resolve(self, made: dict[str, Any]) -> Any:
        raise NotImplementedError


def resolve(value: Any, made: dict[str, Any]) -> Any:
    """`value` with every `Ref` in it (in tuples, lists, dict values, or a `Resolves`) replaced by
    what it stands for."""
    if isinstance(value, Ref):
        return value.value(made)
    if isinstance(value, tuple):
        return tuple(resolve(v, made) for v in value)
    if isinstance(value, list):
        return [resolve(v, made) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, made) for k, v in value.items()}
    if isinstance(value, Resolves):
        return value.resolve(made)
    return value


@dataclass(frozen=True)
class ActorSpec(Resolves):
    """One actor of the deployment: `cls` (a `ray.remote` class) made as `name` in `NAMESPACE`
    with `options` (its CPU share, custom resources, restart policy) and `args`/`kwargs`."""

    role: str  # session_log, background, interaction, router, ingress
    name: str
    cls: Any
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def resolve(self, made: dict[str, Any]) -> ActorSpec:
        return replace(self, args=resolve(self.args, made), kwargs=resolve(self.kwargs, made))

    def named(self, name: str) -> ActorSpec:
        return replace(self, name=name)

    def create(self, **how: Any) -> Any:
        """Make the actor (its arguments resolved already); `how` adds creation options such as
        `lifetime="detached", get_if_exists=True`."""
        return self.cls.options(name=self.name, namespace=NAMESPACE, **self.options, **how).remote(*self.args, **self.kwargs)
