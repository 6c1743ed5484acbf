"""`LogWriter`: the interaction actor's calls to the session log, in order, off the tick's path.

Every chunk, output, task and update is appended in the order it was queued; neither the step nor
delegation waits on the log. The calls wait in one bounded queue (`backlog`): while the log fails
they are retried with backoff (each append carries a request id, so a retry never doubles it);
past the bound the oldest are dropped and counted; a call the log refuses (ProtocolError) is not
retried. Each call carries the writer epoch of its sessions: a session the log says "moved" (its
epoch is stale: it was resumed elsewhere) is handed to `on_moved`, which lets it go here.
Snapshots go behind their tick's appends, with what this actor knows of the session besides the
engine state (`INTERACTION_STATE`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from protocols import ProtocolError
from protocols.ports import Log
from protocols.seams import AppendResult

from actors.interaction.core import Core, JoinedSession

log = logging.getLogger("interplay.interaction")

LOG_RETRY_S = (0.05, 2.0)  # backoff of a failing log call: first and longest wait
INTERACTION_STATE = "interaction"  # the key of this actor's part of a snapshot


@dataclass
class _LogCall:
    """One queued call to the log, repeatable (appends carry a request id)."""

    call: Callable[[], Awaitable[Any]]
    what: str
    done: Callable[[Any], None] | None = None


class LogWriter:
    """With `log_port` None nothing is queued: appends, closes and snapshots are no-ops."""

    def __init__(self, core: Core, log_port: Log | None, backlog: int, snapshot_every: int | None, on_moved: Callable[[JoinedSession], None]):
        self.core, self.log, self.backlog = core, log_port, backlog
        self.snapshot_every = snapshot_every
        self.on_moved = on_moved
        self.queue: deque[_LogCall] = deque()
        self._writer: asyncio.Task | None = None
        self._queued = self._finished = 0
        self._progress_event = asyncio.Event()
        self._request_prefix = secrets.token_hex(6)
        self._requests = 0
        self._phase = 0  # the next session's snapshot turn

    def append(self, deltas: list, sessions: Iterable[JoinedSession] = ()) -> None:
        """Queue an append behind the calls before it (so the log keeps their order), with the
        writer epoch of each session in it: of `sessions` (those the deltas were made for, which
        may have left since), else of the session here."""
        port = self.log
        if port is None or not deltas:
            return
        self._requests += 1
        request_id = f"{self._request_prefix}:{self._requests}"  # the same on every retry: appended once
        epochs = {s.session_id: s.epoch for s in sessions}
        for sid in {d.session_id for d in deltas} - set(epochs):
            if sid in self.core.sessions:
                epochs[sid] = self.core.sessions[sid].epoch
        self._queue(_LogCall(lambda: port.append(deltas, request_id, epochs), f"append {request_id}",
                             lambda result: self._appended(result, epochs)))

    def close(self, session: JoinedSession) -> None:
        port = self.log
        if port is None:
            return
        sid, epoch = session.session_id, session.epoch
        self._queue(_LogCall(lambda: port.close(sid, epoch), f"close {sid!r}"))

    def snapshot(self, session: JoinedSession, tick: int, state: dict) -> None:
        """Queue `state` (the engine's, after `tick`) as the session's snapshot, with what this
        actor knows of it: tools, typed text and the update texts still waiting for a chunk (on
        resume, those that entered with the chunks replayed are not waiting any more)."""
        port = self.log
        if port is None:
            return
        mine = {"tools": session.tools, "tool_choice": session.tool_choice, "typed": list(session.typed),
                "pending": list(session.updates)}
        state = {**state, INTERACTION_STATE: mine}
        every = self.snapshot_every or 1
        session.snapshot_due = tick + 1 + (session.snapshot_phase - tick - 1) % every
        self.core.totals["snapshots"] += 1
        sid, epoch = session.session_id, session.epoch
        self._queue(_LogCall(lambda: port.put_snapshot(sid, tick, state, epoch), f"snapshot {sid!r} at tick {tick}"))

    def turn(self) -> int:
        """The next session's snapshot turn: sessions get them in rotation, so one tick does not export them all."""
        turn = self._phase
        self._phase = (self._phase + 1) % (self.snapshot_every or 1)
        return turn

    def _appended(self, result: AppendResult, epochs: dict[str, int]) -> None:
        sessions = self.core.sessions
        for sid, (_, last) in result.items():
            session = sessions.get(sid)
            if session is not None:
                session.log_index = max(session.log_index, int(last))
        for sid in result.moved:
            session = sessions.get(sid)
            if session is not None and session.epoch == epochs.get(sid):  # not resumed here again since
                self.on_moved(session)

    def _queue(self, call: _LogCall) -> None:
        self.queue.append(call)
        self._queued += 1
        while len(self.queue) > self.backlog:  # the log is down or slow: drop the oldest
            dropped = self.queue.popleft()
            self.core.totals["log_dropped"] += 1
            self._progress()
            log.warning("log backlog full: dropped %s", dropped.what)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        """The one writer: each queued call in order, retried with backoff while the log fails."""
        wait, failing = LOG_RETRY_S[0], False
        try:
            while self.queue:
                call = self.queue[0]
                ok = await self._call(call, failing)
                if not ok:
                    failing = True
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, LOG_RETRY_S[1])
                    continue
                if failing:
                    log.info("the session log is back")
                wait, failing = LOG_RETRY_S[0], False
                if self.queue and self.queue[0] is call:  # not dropped meanwhile
                    self.queue.popleft()
                    self._progress()
        finally:
            self._writer = None

    async def _call(self, call: _LogCall, failing: bool) -> bool:
        """Make one call; False when it failed and is to be retried."""
        try:
            result = await call.call()
        except ProtocolError as exc:
            self.core.totals["log_refused"] += 1
            log.warning("the session log refused %s: %s", call.what, exc)
        except Exception:
            self.core.totals["log_retries"] += 1
            if not failing:
                log.exception("session log call failed (%s); retrying", call.what)
            return False
        else:
            if call.done is not None:
                call.done(result)
        return True

    def _progress(self) -> None:
        self._finished += 1
        self._progress_event.set()
        self._progress_event = asyncio.Event()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every log call queued so far is done (or dropped); False if `timeout` passed first."""
        target = self._queued

        async def done():
            while self._finished < target:
                await self._progress_event.wait()

        try:
            await asyncio.wait_for(done(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
