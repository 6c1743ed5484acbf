"""Deleting closed sessions once they have been closed for `keep_s` seconds: the data-retention promise.

A session closed for `keep_s` is deleted whole: its Parquet, WAL, snapshots and session.json with
its folder, and whatever memory holds of it. Open sessions are never deleted, and without
`keep_s` (None) nothing is. `Retention.sweep` does it, by itself every min(keep_s / 10, 60 s)
where an event loop runs (the log actor's), its file work in a thread so appends go on; a delete
that fails is logged and tried again at the next sweep. A restarted log deletes at once what
expired while it was down (`restored`). While a session's files are being deleted its id is
neither found nor reopened.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from actors.log.log_sessions import Sessions
from actors.log.log_store import LogSession, LogStore

log = logging.getLogger("interplay.session_log")


class Retention:
    """Deletes the closed sessions of `sessions` that `keep_s` has run out for (None: keeps all)."""

    def __init__(self, sessions: Sessions, store: LogStore, keep_s: float | None, clock: Callable[[], float]):
        self.sessions = sessions
        self.store = store
        self.keep_s = keep_s
        self.clock = clock
        self._sweeper: asyncio.Task | None = None

    def restored(self, closed: list[LogSession]) -> None:
        """List the closed sessions a starting log found on disk, and delete those already expired."""
        if self.keep_s is None:
            return
        now = self.clock()
        for s in closed:
            closed_at = now if s.closed_at is None else s.closed_at  # a closed one read back has its time
            self.sessions.closed[s.session_id] = (closed_at, s.dirname)
            if closed_at + self.keep_s <= now:  # expired while the log was down
                self._delete(s.session_id)

    def closing(self, s: LogSession) -> None:
        """`keep_s` starts counting for a session just closed."""
        if self.keep_s is not None and s.closed_at is not None:
            self.sessions.closed[s.session_id] = (s.closed_at, s.dirname)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete every session closed for `keep_s` or longer at `now` (default: the clock); the ids deleted."""
        if self.keep_s is None:
            return []
        now = self.clock() if now is None else float(now)
        due = [sid for sid, (closed_at, _) in self.sessions.closed.items() if closed_at + self.keep_s <= now]
        gone = []
        for sid in due:
            if await self._delete_async(sid):
                gone.append(sid)
        return gone

    def start(self) -> None:
        """Sweep every min(keep_s / 10, 60 s) on the running event loop, if there is one (the
        actor's is; without one, call `sweep`)."""
        if self.keep_s is None or (self._sweeper is not None and not self._sweeper.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweeper = loop.create_task(self._sweep_forever(min(self.keep_s / 10, 60.0)))

    async def _sweep_forever(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception:
                log.exception("sweeping expired sessions failed; trying again in %.0f s", period)

    async def _delete_async(self, session_id: str) -> bool:
        entry = self.sessions.closed.pop(session_id, None)
        if entry is None:  # deleted meanwhile by another sweep
            return False
        self.sessions.forget(session_id)
        self.sessions.deleting.add(session_id)
        try:
            await asyncio.to_thread(self.store.delete, entry[1])
            return True
        except OSError as exc:
            log.error("session %r: could not delete its files (%s); trying again at the next sweep", session_id, exc)
            self.sessions.closed[session_id] = entry
            return False
        finally:
            self.sessions.deleting.discard(session_id)

    def _delete(self, session_id: str) -> None:
        """`_delete_async` inline, for a log starting up."""
        entry = self.sessions.closed.pop(session_id)
        self.sessions.forget(session_id)
        try:
            self.store.delete(entry[1])
        except OSError as exc:
            log.error("session %r: could not delete its files (%s); trying again at the next sweep", session_id, exc)
            self.sessions.closed[session_id] = entry
