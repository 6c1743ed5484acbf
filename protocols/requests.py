"""Typed client requests: what a client asks of the interaction side, carried on an `InputChunk`.

The ingress reads them off the Realtime client events it forwards (`requests_of`); the interaction
actor acts on these and never reads client events. `SessionSettings` is the part of a
session.update it keeps (function tools, tool_choice); `TaskRequest` is a response.create (a
background task when function tools are set). Both validate on construction, raising
`ProtocolError`, and go to the log as JSON (`to_dict` / `request_from_dict`), so a replay rebuilds
the same state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Union

from .errors import ProtocolError

MAX_INSTRUCTIONS_CHARS = 4_096

TOOL_CHOICES = ("auto", "none", "required")
ToolChoice = Union[str, dict]  # one of TOOL_CHOICES, or {"type": "function", "name": ...}


def _check_tools(tools: Any, param: str) -> None:
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ProtocolError(f"{param} must be a list of tool objects", "invalid_value", param)


def _check_choice(choice: Any, param: str) -> None:
    if choice is not None and choice not in TOOL_CHOICES and not isinstance(choice, dict):
        raise ProtocolError(f"{param} must be one of {list(TOOL_CHOICES)} or a function choice, got {choice!r}", "invalid_value", param)


@dataclass(frozen=True)
class SessionSettings:
    """A session.update's tools and tool_choice; None: not changed ([] tools: none any more)."""

    tools: list | None = None
    tool_choice: ToolChoice | None = None

    def __post_init__(self) -> None:
        _check_tools(self.tools, "session.tools")
        _check_choice(self.tool_choice, "session.tool_choice")

    def to_dict(self) -> dict:
        return {"type": "session_settings", **asdict(self)}


@dataclass(frozen=True)
class TaskRequest:
    """A response.create: its own tools, tool_choice and instructions (None: the session's)."""

    tools: list | None = None
    tool_choice: ToolChoice | None = None
    instructions: str | None = None

    def __post_init__(self) -> None:
        _check_tools(self.tools, "response.tools")
        _check_choice(self.tool_choice, "response.tool_choice")
        if self.instructions is not None:
            if not isinstance(self.instructions, str) or len(self.instructions) > MAX_INSTRUCTIONS_CHARS:
                raise ProtocolError(f"response.instructions must be a string of at most {MAX_INSTRUCTIONS_CHARS} characters", "invalid_value", "response.instructions")

    def to_dict(self) -> dict:
        return {"type": "task_request", **asdict(self)}


Request = Union[SessionSettings, TaskRequest]
_TYPES = {"session_settings": SessionSettings, "task_request": TaskRequest}


def request_from_dict(d: dict) -> Request:
    """The request `to_dict` wrote."""
    if not isinstance(d, dict) or d.get("type") not in _TYPES:
        raise ProtocolError(f"a request must be an object with a type in {list(_TYPES)}", "invalid_value", "requests")
    try:
        return _TYPES[d["type"]](**{k: v for k, v in d.items() if k != "type"})
    except TypeError as exc:
        raise ProtocolError(f"malformed {d['type']}: {exc}", "invalid_value", "requests") from None


def check_requests(requests: Any, param: str = "requests") -> list:
    if not isinstance(requests, list) or not all(isinstance(r, (SessionSettings, TaskRequest)) for r in requests):
        raise ProtocolError(f"{param} must be a list of SessionSettings and TaskRequest", "invalid_value", param)
    return requests


def requests_of(events: list[dict]) -> list[Request]:
    """The requests in forwarded Realtime client events (session.update, response.create)."""
    out: list[Request] = []
    for event in events:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "session.update":
            config = event.get("session") or {}
            if "tools" in config or "tool_choice" in config:
                tools = (config["tools"] or []) if "tools" in config else None
                out.append(SessionSettings(tools, config.get("tool_choice")))
        elif kind == "response.create":
            response = event.get("response") or {}
            tools = (response["tools"] or []) if "tools" in response else None
            out.append(TaskRequest(tools, response.get("tool_choice"), response.get("instructions")))
    return out
