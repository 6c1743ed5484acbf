"""The SessionLog's sessions in memory, and who may read or write each.

`Sessions` holds the open sessions (always in memory), the last `RECENT_CLOSED` closed ones that
were closed or read (tasks that ran late read them), and with `keep_s` the list of every closed
session on disk with when it closed (what `actors.log.log_retention` deletes). Any other closed
session is read from storage when asked for (`find`), so memory does not grow with the calls
served. It also remembers the index ranges of the last `REMEMBERED_REQUESTS` appends by request
id, so a retried append returns the first call's ranges instead of appending again.

`authorize` checks a session's token (its SHA-256 against session.json's, in constant time):
"unknown_session" if there is no such session, "forbidden" if the token is not its token.
`writable` is an open session or ProtocolError ("unknown_session", "session_closed").
"""

from __future__ import annotations

import asyncio
import hmac
from collections import OrderedDict

from protocols.chunks import ProtocolError

from actors.log.log_restore import find
from actors.log.log_store import LogSession, LogStore, hash_token

RECENT_CLOSED = 32  # closed sessions held in memory (the last closed or read), the rest read from disk
REMEMBERED_REQUESTS = 4096


class Sessions:
    """The sessions of one log; `store` is where closed ones are read from."""

    def __init__(self, store: LogStore, keep_s: float | None):
        self.store = store
        self.keep_s = keep_s
        self.open: dict[str, LogSession] = {}
        self.recent: OrderedDict[str, LogSession] = OrderedDict()  # a few closed ones, newest last
        self.closed: dict[str, tuple[float, str]] = {}  # with keep_s, every closed one on disk: (closed_at, dirname)
        self.deleting: set[str] = set()
        self.requests: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()

    def in_memory(self) -> list[LogSession]:
        return [*self.open.values(), *self.recent.values()]

    # --- request ids ---------------------------------------------------------------------------

    def request_span(self, request_id: str | None, session_id: str) -> tuple[int, int] | None:
        """The rows an earlier append with `request_id` gave the session, if it is remembered."""
        return self.requests.get(request_id, {}).get(session_id) if request_id is not None else None

    def remember_request(self, request_id: str, session_id: str, span: tuple[int, int]) -> None:
        self.requests.setdefault(request_id, {})[session_id] = span
        self.requests.move_to_end(request_id)
        while len(self.requests) > REMEMBERED_REQUESTS:
            self.requests.popitem(last=False)

    # --- closed sessions -----------------------------------------------------------------------

    def hold_closed(self, s: LogSession) -> None:
        self.recent[s.session_id] = s
        self.recent.move_to_end(s.session_id)
        while len(self.recent) > RECENT_CLOSED:
            self.recent.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Drop what memory holds of a closed session: its rows' places and its request ids."""
        self.recent.pop(session_id, None)
        for rid in [rid for rid, spans in self.requests.items() if session_id in spans]:
            del self.requests[rid][session_id]
            if not self.requests[rid]:
                del self.requests[rid]

    # --- finding -------------------------------------------------------------------------------

    def find(self, session_id) -> LogSession | None:
        """An open session, or a closed one from memory or else storage; None if there is none."""
        s, ask = self._known(session_id)
        if ask:
            s = self._found(session_id, self._from_store(session_id))
        return s

    async def find_async(self, session_id) -> LogSession | None:
        """`find`, asking storage in a thread."""
        s, ask = self._known(session_id)
        if ask:
            s = self._found(session_id, await asyncio.to_thread(self._from_store, session_id))
        return s

    def writable(self, session_id: str) -> LogSession:
        """The open session `session_id`; ProtocolError if it is unknown or closed."""
        s = self.open.get(session_id)
        if s is not None:
            return s
        if self.find(session_id) is None:
            raise ProtocolError(f"unknown session {session_id!r}: open it before appending", "unknown_session", "session_id")
        raise ProtocolError(f"session {session_id!r} is closed", "session_closed", "session_id")

    def authorize(self, session_id: str, token: str) -> LogSession:
        return check_token(self.find(session_id), session_id, token)

    async def authorize_async(self, session_id: str, token: str) -> LogSession:
        return check_token(await self.find_async(session_id), session_id, token)

    def _known(self, session_id) -> tuple[LogSession | None, bool]:
        """The session if memory holds it, and whether storage must be asked (a closed one)."""
        if not isinstance(session_id, str):
            return None, False
        s = self.open.get(session_id) or self.recent.get(session_id)
        if s is not None:
            if s.closed:
                self.recent.move_to_end(session_id)
            return s, False
        if session_id in self.deleting or (self.keep_s is not None and session_id not in self.closed):
            return None, False  # with keep_s every closed session on disk is listed
        return None, True

    def _from_store(self, session_id: str) -> LogSession | None:
        try:
            return find(self.store, session_id)
        except OSError as exc:
            raise ProtocolError(f"could not read session {session_id!r} from storage: {exc.strerror or exc}", "log_unavailable") from None

    def _found(self, session_id: str, s: LogSession | None) -> LogSession | None:
        """Hold a closed session read from storage, unless it went meanwhile (deleted) or is held already."""
        if s is None or session_id in self.deleting or (self.keep_s is not None and session_id not in self.closed):
            return None
        held = self.open.get(session_id) or self.recent.get(session_id)
        if held is not None:
            return held
        self.hold_closed(s)
        return s


def check_token(s: LogSession | None, session_id, token) -> LogSession:
    if s is None:
        raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
    if not isinstance(token, str) or not hmac.compare_digest(s.token_hash, hash_token(token)):
        raise ProtocolError(f"this token does not grant access to session {session_id!r}", "forbidden", "token")
    return s
