"""What every engine checks of a tick's chunks before stepping them, written once for all families.

`validate(chunks, check, live, missing)` -> (a chunk for every live session, the errors): what is
not an `InputChunk`, and a second chunk for one session, are refused here; every other chunk goes
through the engine's own `check` (which returns its session id and a private, checked copy, or
raises `ProtocolError`, for an unknown session among others). A refused chunk's error is keyed by
its session id (or its repr where it has none) and the session is stepped as missing, as is every
live session that sent no chunk. `session_of` is the lookup that refuses an unknown session id.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, TypeVar

from protocols.chunks import InputChunk, ProtocolError


S = TypeVar("S")


def validate(
    chunks: list[Any],
    check: Callable[[InputChunk], tuple[str, InputChunk]],
    live: Iterable[str],
    missing: Callable[[str, Any], InputChunk],
) -> tuple[dict[str, InputChunk], dict[str, ProtocolError]]:
    """-> a chunk for every live session (good chunks in their order, then silent ones for the
    sessions stepped as missing, made by `missing(session_id, its refused chunk or None)`), and
    the errors."""
    accepted: dict[str, InputChunk] = {}
    errors: dict[str, ProtocolError] = {}
    bad: dict[str, Any] = {}
    for c in chunks:
        try:
            if not isinstance(c, InputChunk):
                raise ProtocolError(f"expected an InputChunk, got {type(c).__name__}", "invalid_value", "chunk")
            if isinstance(c.session_id, str) and c.session_id in accepted:  # any other id is refused by `check`
                raise ProtocolError(f"session {c.session_id!r} has more than one chunk in this step", "duplicate_session", "session_id")
            sid, good = check(c)
            accepted[sid] = good
        except ProtocolError as e:
            sid = getattr(c, "session_id", None)
            key = sid if isinstance(sid, str) else repr(c)[:64]
            errors.setdefault(key, e)
            bad.setdefault(key, c)
    for sid in live:
        if sid not in accepted:
            errors.setdefault(sid, ProtocolError(f"no chunk for session {sid!r}; stepped as missing", "missing_session", "session_id"))
            accepted[sid] = missing(sid, bad.get(sid))
    return accepted, errors


def session_of(sessions: Mapping[str, S], session_id: Any) -> S:
    """The session `session_id` names; ProtocolError if there is none (or the id is not a str)."""
    sess = sessions.get(session_id) if isinstance(session_id, str) else None
    if sess is None:
        raise ProtocolError(f"unknown session {session_id!r}", "unknown_session", "session_id")
    return sess
