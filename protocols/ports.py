"""The typed ports parts talk through. Each is a `typing.Protocol`: any object with these methods
fits, so a test passes a small real or mock implementation by constructor argument and the
application binds Ray handles (through `actors.remote.Remote`) in one builder.

- `Engine`: the batched streaming model (sync; the interaction actor runs it off its loop).
- `Interaction`: what an ingress needs of the interaction side (join, leave, one exchange a tick,
  and moving a session between interaction actors: `release` here, `resume` there).
- `Log`: the session log's write side, and what a session's state is rebuilt from.
- `BackgroundPool`: runs a delegated task and streams its updates back.
- `Placement`: which interaction actor steps a session (`actors.interaction.placement.Direct`,
  `actors.interaction.router.Router`); `Routing`: the router actor as the deployment sees it.
- `Ingress`: what the gateway asks of an ingress actor (offer a call, close it, figures).
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Protocol, runtime_checkable

from .background import BackgroundTask, BackgroundUpdate
from .chunks import InputChunk, OutputChunk, ProtocolError
from .seams import AppendResult, InteractionStats, Joined, Recovery


@runtime_checkable
class Engine(Protocol):
    """Steps every session in one batch per tick. `tick_ms` is the tick length it was trained at."""

    @property
    def tick_ms(self) -> int: ...

    @property
    def max_sessions(self) -> int: ...

    @property
    def sessions(self) -> list[str]:
        """Ids of the sessions it holds now."""
        ...

    def add_session(self, session_id: str, seed: int | None = None) -> None: ...

    def remove_session(self, session_id: str) -> None: ...

    def step(self, chunks: list[InputChunk]) -> tuple[list[OutputChunk], dict[str, ProtocolError]]:
        """One micro-turn for every session. A bad chunk never stops the others: its session is
        stepped as missing and the error is returned under its id."""
        ...

    def push_update(self, session_id: str, text: str) -> None:
        """Text of a background update, woven into the session's following micro-turns."""
        ...

    def export_session(self, session_id: str) -> dict: ...

    def import_session(self, session_id: str, state: dict) -> None: ...

    def replay(self, session_id: str, state: dict | None = None, seed: int | None = None, chunks: Any = ()) -> tuple[dict, list[OutputChunk]]:
        """Step one session's `chunks` alone from `state` (or fresh), touching no live session
        (safe beside `step`): -> the state after them and their outputs."""
        ...


@runtime_checkable
class Interaction(Protocol):
    """The interaction side as an ingress sees it (in process, or a Ray actor through `Remote`)."""

    async def clock_info(self) -> dict: ...

    async def join(self, session_id: str, seed: int | None = None) -> Joined: ...

    async def leave(self, session_id: str) -> None: ...

    async def exchange(self, tick: int, chunks: list[InputChunk], session_ids: list[str]) -> list[OutputChunk]: ...

    async def resume(self, session_id: str) -> Joined:
        """Join a session that was live elsewhere (a dead or draining interaction actor): its model
        state is rebuilt from the log (the newest snapshot, then its logged input chunks replayed)
        and it is stepped on from the next tick. Answers like `join`, with what the rebuild did
        (`Joined.resumed`); a session already here is answered as it is (`resumed` None)."""
        ...

    async def release(self, session_id: str) -> None:
        """Let a session go so that another actor can `resume` it: its state is snapshotted into
        the log and it leaves without its log being closed."""
        ...

    async def drop(self, session_id: str) -> None:
        """Let a session go that lives elsewhere now: nothing snapshotted or logged, its log open."""
        ...

    async def stats(self, last: int = 50) -> InteractionStats:
        """Recent figures (the last `last` ticks) and totals since the actor started."""
        ...


@runtime_checkable
class Log(Protocol):
    """The session log's write side; `append` is idempotent per `request_id`. One writer per
    session: a writer passes the epoch it holds (`epochs`, `epoch`), and one holding an older
    epoch than the session's is refused ("session_moved"; for `append`, listed in `moved`)."""

    async def open(self, session_id: str) -> str: ...

    async def close(self, session_id: str, epoch: int | None = None) -> None: ...

    async def append(self, deltas: list[Any], request_id: str | None = None, epochs: dict[str, int] | None = None) -> AppendResult: ...

    async def put_snapshot(self, session_id: str, tick: int, state: dict, epoch: int | None = None) -> None:
        """Keep `state` (an `Engine.export_session` after tick `tick` was stepped) as the session's
        newest snapshot, durably: a restarted log still has it."""
        ...

    async def recovery(self, session_id: str, take_over: bool = True) -> Recovery:
        """What rebuilds the session (`protocols.seams.Recovery`); with `take_over` the caller
        gets a new writer epoch and the previous writer is fenced off."""
        ...


@runtime_checkable
class BackgroundPool(Protocol):
    """Runs one task; its updates stream back. Cancelling the consumer cancels the task."""

    def run(self, task: BackgroundTask) -> AsyncGenerator[BackgroundUpdate, None]: ...


@runtime_checkable
class Placement(Protocol):
    """Where sessions are stepped. `place` joins a new session somewhere with room; `locate` says
    where a session lives now, resuming it from the log when the actor named `lost_on` (where the
    ingress last found it) no longer has it (`gone`: that actor did not answer at all). Each
    answers an `actors.interaction.placement.Placed`."""

    async def place(self, session_id: str, tenant: str | None = None) -> Any: ...

    async def locate(self, session_id: str, lost_on: str | None = None, gone: bool = False) -> Any: ...

    async def leave(self, session_id: str) -> None: ...


@runtime_checkable
class Routing(Placement, Protocol):
    """The router: a `Placement` that also names the Ray handle of each interaction actor it
    places on (`handles`: the fleet's figures are read from every actor through them)."""

    async def handles(self) -> dict[str, Any]: ...


@runtime_checkable
class Ingress(Protocol):
    """An ingress actor as the gateway sees it: `offer` takes a WebRTC call (SDP offer in,
    {"session_id", "sdp"} out), `close` ends one (its `owner` only), `stats` counts its calls."""

    async def offer(self, sdp: str, session_config: dict | None = None, owner: str | None = None, tenant: str | None = None,
                    ceiling: dict | None = None) -> dict: ...

    async def close(self, session_id: str, owner: str | None = None) -> None: ...

    async def stats(self) -> dict: ...
