"""Background work: tasks the live model delegates, and the updates that stream back.

A `BackgroundTask` carries a reference into the SessionLog, not a stripped query: its session, the
log index it saw (`context_upto`) and the session's read token (`log_token`), so the background
model reads the whole conversation by reference (`actors.background.context.render`). The token is a
capability: it never enters the log (`actors.log.log_checks` drops it) and never shows in a repr.
`ToolCall` / `ToolResult` record tool use; `SessionEvent` records everything else that happens
to a session (joined, config changed, client event, error, left).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .chunks import ProtocolError, check_session_id, check_text

TASK_KINDS = ("delegate", "tool")
UPDATE_STATUSES = ("progress", "partial", "final", "error", "cancelled")
MAX_JSON_BYTES = 1 << 20  # structured payloads above 1 MiB are refused


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def check_json(value: Any, param: str) -> Any:
    """JSON-serialisable and not oversized; returns the value unchanged."""
    try:
        encoded = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{param} must be JSON-serialisable: {exc}", "invalid_value", param) from None
    if len(encoded.encode()) > MAX_JSON_BYTES:
        raise ProtocolError(f"{param} is larger than {MAX_JSON_BYTES} bytes", "invalid_value", param)
    return value


def _check_choice(value: str, choices: tuple[str, ...], param: str) -> str:
    if value not in choices:
        raise ProtocolError(f"{param} must be one of {list(choices)}, got {value!r}", "invalid_value", param)
    return value


@dataclass
class BackgroundTask:
    """Work handed to the background pool. `context_upto` is the last log index the task saw (-1:
    none yet); `log_token` the session's token for reading the log up to there (None: no log)."""

    session_id: str
    t: float
    kind: str
    instruction: str
    context_upto: int
    task_id: str = field(default_factory=lambda: new_id("task"))
    tool: str | None = None
    arguments: dict = field(default_factory=dict)
    supersedes: str | None = None
    log_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.t = float(self.t)
        _check_choice(self.kind, TASK_KINDS, "kind")
        check_text(self.instruction, "instruction")
        if isinstance(self.context_upto, bool) or not isinstance(self.context_upto, int) or self.context_upto < -1:
            raise ProtocolError("context_upto must be a log index (>= -1)", "invalid_value", "context_upto")
        if self.log_token is not None and (not isinstance(self.log_token, str) or not self.log_token):
            raise ProtocolError("log_token must be the session's log token or null", "invalid_value", "log_token")
        if not isinstance(self.arguments, dict):
            raise ProtocolError("arguments must be a JSON object", "invalid_value", "arguments")
        check_json(self.arguments, "arguments")


@dataclass
class BackgroundUpdate:
    """A streamed result of a task. `contradicts` marks a result at odds with what was already said."""

    session_id: str
    t: float
    task_id: str
    status: str
    text: str = ""
    data: Any = None
    contradicts: bool = False

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.t = float(self.t)
        _check_choice(self.status, UPDATE_STATUSES, "status")
        check_text(self.text, "text")
        check_json(self.data, "data")
        self.contradicts = bool(self.contradicts)


@dataclass
class ToolCall:
    session_id: str
    t: float
    name: str
    arguments: dict
    call_id: str = field(default_factory=lambda: new_id("call"))
    task_id: str | None = None

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.t = float(self.t)
        if not isinstance(self.name, str) or not self.name:
            raise ProtocolError("tool name must be a non-empty string", "invalid_value", "name")
        if not isinstance(self.arguments, dict):
            raise ProtocolError("arguments must be a JSON object", "invalid_value", "arguments")
        check_json(self.arguments, "arguments")


@dataclass
class ToolResult:
    session_id: str
    t: float
    call_id: str
    output: Any = None
    error: str | None = None

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.t = float(self.t)
        check_json(self.output, "output")


@dataclass
class SessionEvent:
    """Anything else that happens to a session: `type` like "session.created", `data` a JSON object."""

    session_id: str
    t: float
    type: str
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        self.t = float(self.t)
        if not isinstance(self.type, str) or not self.type:
            raise ProtocolError("event type must be a non-empty string", "invalid_value", "type")
        if not isinstance(self.data, dict):
            raise ProtocolError("event data must be a JSON object", "invalid_value", "data")
        check_json(self.data, "data")
