"""The edge's error shape, shared by the HTTP routes (`deployments.gateway`) and the WebSocket
(`deployments.websocket`): every error is `{"error": {"type", "code", "message"}}` with one short
sentence (`clean`: never a traceback, path or address), and a ProtocolError's code picks its HTTP
status (`HTTP_STATUS`; any other code is the client's mistake, 400)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from protocols import ProtocolError

MAX_MESSAGE_CHARS = 200
# HTTP status of a ProtocolError by its code; any other code is the client's mistake (400).
HTTP_STATUS = {"capacity": 503, "unauthorized": 401, "forbidden": 403, "unknown_session": 404, "rate_limit_exceeded": 429}
UNAVAILABLE = "the service cannot take this request right now; try again shortly"
RETRY_AFTER_S = 1


class HttpError(Exception):
    """A request refused with `status`; `message` is fit for the client as it is."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def api_error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    error = {"type": "server_error" if status >= 500 else "invalid_request_error", "code": code, "message": message}
    if param:
        error["param"] = param
    headers = {}
    if status in (408, 413):  # a refused body may still be arriving: the connection is not worth keeping
        headers["Connection"] = "close"
    if status == 503:  # full or not answering for now: a client may try again in a second
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse({"error": error}, status_code=status, headers=headers or None)


# What only internals look like (a Ray task error's first line names the process: "ray::X.y() (pid=..., ip=...)").
INTERNAL_MARKS = ("Traceback", "pid=", "ip=", 'File "', "ray::", "site-packages", "errors.pydantic.dev")


def clean(message: str) -> str:
    """A message fit for a client: its first line, capped; a generic one where it shows internals."""
    line = str(message).strip().split("\n", 1)[0].strip()
    if any(mark in line for mark in INTERNAL_MARKS):
        return "invalid request"
    if len(line) > MAX_MESSAGE_CHARS:
        line = line[: MAX_MESSAGE_CHARS - 3].rstrip() + "..."
    return line or "invalid request"


def protocol_error(exc: ProtocolError) -> JSONResponse:
    cause = getattr(exc, "cause", None)  # a RayTaskError posing as the ProtocolError it carries
    if isinstance(cause, ProtocolError):
        exc = cause
    code = exc.code if isinstance(exc.code, str) and exc.code.isidentifier() and len(exc.code) <= 64 else "invalid_value"
    param = exc.param if isinstance(exc.param, str) and len(exc.param) <= 64 else None
    return api_error(HTTP_STATUS.get(code, 400), clean(str(exc)), code, param)
