"""The HTTP and WebSocket edge: the routes (`Edge`, `make_api`) and their Serve deployment `Gateway`.

`POST /v1/realtime/calls` (SDP offer in, answer out; the call lives in an ingress actor),
`POST /v1/realtime/calls/{id}/hangup`, `POST /v1/realtime/client_secrets`, the WebSocket
`/v1/realtime` (sessions in the replica's own in-process `Ingress`), `GET /` (the browser page),
`/healthz` and `/metrics`. `deployments.app.build` binds `Gateway` to the actors' handles; `Edge`
is the same edge over any ports, so tests serve it in process.

Browsers are held to an Origin allow-list (`deployments.auth.origin_allowed`, `auth.allowed_origins`):
a call, hang-up, secret or WebSocket from a page elsewhere is answered 403 before anything else.
Per-caller limits: a caller's sessions are counted against its API key (`limits.sessions_per_key`,
429 past it, counted by the router), and a client secret's bound config is the ceiling of the
sessions it opens.

No input gets a 5xx other than 503 (the service cannot answer now), and every error is JSON,
`{"error": {"type", "code", "message"}}`, whose message is one short sentence: a ProtocolError's
first line, never a traceback, path or address (those are logged here). Bodies are read against a
size cap (413) and a deadline (408); JSON in them is parsed with its nesting bounded.
"""

# No postponed annotations in this module: FastAPI reads the routes' parameter types.

import asyncio
import functools
import json
import logging
from pathlib import Path
from typing import Any, Literal, cast

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.actor import ActorHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from actors.remote import Remote
from protocols import ProtocolError, TickClock
from protocols.ports import Ingress as IngressPort, Routing

from .auth import Auth, AuthError, Grant, origin_allowed
from .config import AppConfig
from .errors import UNAVAILABLE, HttpError, api_error, clean, protocol_error
from .websocket import detached, serve_websocket

log = logging.getLogger("interplay.gateway")

WEB_DIR = Path(__file__).resolve().parents[1] / "examples" / "web"
MAX_JSON_DEPTH = 32
MAX_CALL_ID_CHARS = 128


def answers(route):
    """Every outcome of a route is an answer: an HttpError or ProtocolError its own status, any
    other exception 503 with a generic message (the detail stays in the log)."""

    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except HttpError as exc:
            return api_error(exc.status, str(exc), exc.code, exc.param)
        except AuthError as exc:
            return api_error(exc.status, clean(str(exc)), "unauthorized")
        except ProtocolError as exc:
            return protocol_error(exc)
        except Exception:
            log.exception("%s failed", route.__name__)
            return api_error(503, UNAVAILABLE, "unavailable")

    return wrapper


# --- reading requests -----------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, at most `max_bytes` (413 past it, as soon as it is past) and all of it
    within `timeout_s` (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HttpError(400, "invalid Content-Length header", "invalid_request")
        if int(declared) > max_bytes:
            raise HttpError(413, f"the body is larger than {max_bytes} bytes", "body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise HttpError(413, f"the body is larger than {max_bytes} bytes", "body_too_large")
    except TimeoutError:
        raise HttpError(408, f"the body did not arrive within {timeout_s:g} s", "request_timeout") from None
    except ClientDisconnect:
        raise HttpError(400, "the client went away before its body arrived", "invalid_request") from None
    return bytes(body)


def _depth_ok(text: str, max_depth: int) -> bool:
    """Whether no array or object in JSON `text` nests deeper than `max_depth` (strings skipped)."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str, what: str = "the body", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text parsed with its nesting bounded; HttpError 400 "invalid_json" otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise HttpError(400, f"{what} is not UTF-8", "invalid_json") from None
    if not _depth_ok(text, max_depth):
        raise HttpError(400, f"{what} nests deeper than {max_depth} levels", "invalid_json")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise HttpError(400, f"{what} is not valid JSON", "invalid_json") from None


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one sentence: where and what, without the input or a documentation URL."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errors:
        return clean(f"{prefix}invalid value")
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return clean(f"{prefix}{where + ': ' if where else ''}{first.get('msg', 'invalid value')}{more}")


def session_config(raw: Any) -> dict:
    """A client's session config validated and in canonical form (what the ingress would make of
    it); HttpError 400 with a clean message otherwise."""
    from actors.ingress.ingress import check_config
    from protocols.realtime_config import SessionConfig

    if not isinstance(raw, dict):
        raise HttpError(400, "'session' must be a JSON object", "invalid_value", "session")
    try:
        SessionConfig.model_validate(raw)
    except ValidationError as exc:
        raise HttpError(400, validation_message(exc, "invalid session config: "), "invalid_value", "session") from None
    return check_config(raw)


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"] = "created_at"
    seconds: int = Field(ge=10)


class SecretRequest(BaseModel):
    """A `POST /v1/realtime/client_secrets` body, as the Realtime API has it."""

    model_config = ConfigDict(extra="forbid")
    session: dict | None = None
    expires_after: ExpiresAfter | None = None


async def _field_text(value: str | UploadFile | None) -> str | None:
    """A form field's text, whether it came as a field or as a file."""
    return (await value.read()).decode("utf-8") if isinstance(value, UploadFile) else value


async def _offer_parts(request: Request, body: bytes) -> tuple[str, Any]:
    """An offer's SDP and its `session` (None when it has none) from a raw application/sdp body
    or a multipart one with `sdp` and `session` fields."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        form = None
        try:  # the body as read (capped, on time), parsed again as a form; fields may come as files
            form = await Request(request.scope, replay).form(max_files=2, max_fields=8)
            sdp, session = [await _field_text(form.get(name)) for name in ("sdp", "session")]
        except Exception:
            raise HttpError(400, "the multipart body could not be read", "invalid_request") from None
        finally:
            if form is not None:
                await form.close()
        if not isinstance(sdp, str):
            raise HttpError(400, "a multipart offer needs an 'sdp' field", "invalid_sdp", "sdp")
        return sdp, parse_json(session, "'session'") if session else None
    if kind not in ("application/sdp", "text/plain", ""):
        raise HttpError(400, "unsupported content type: send application/sdp, or multipart/form-data with 'sdp' and 'session'", "invalid_sdp")
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        raise HttpError(400, "the offer is not UTF-8 text", "invalid_sdp", "sdp") from None


# --- the edge -------------------------------------------------------------------------------------


class Edge:
    """The routes' logic over ports: `interaction` and `ingress` (awaitable methods: the actors
    through `Remote`, or in-process objects), and `websockets`, the in-process `Ingress` that holds
    this process's WebSocket sessions."""

    def __init__(self, config: AppConfig, auth: Auth, interaction: Any, ingress: Any, websockets: Any):
        self.config = config
        self.limits = config.limits
        self.auth = auth
        self.interaction = interaction
        self.ingress = ingress
        self.websockets = websockets

    async def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    async def healthz(self) -> JSONResponse:
        try:
            stats = await self.interaction.stats()
            await self.ingress.stats()
        except Exception:  # an actor is down: the deployment is not healthy
            log.exception("health check failed")
            return api_error(503, "unhealthy: a part of the service is not answering", "unhealthy")
        return JSONResponse({"status": "ok", "sessions": stats["sessions"], "tick": stats["tick"]})

    @answers
    async def metrics(self) -> PlainTextResponse:
        interaction = await self.interaction.stats()
        ingress = await self.ingress.stats()
        lines = [
            "# TYPE interplay_sessions gauge", f"interplay_sessions {interaction['sessions']}",
            "# TYPE interplay_tick counter", f"interplay_tick {interaction['tick']}",
            "# TYPE interplay_step_ms gauge",
            f'interplay_step_ms{{quantile="0.5"}} {interaction["step_ms_p50"]:.3f}',
            f'interplay_step_ms{{quantile="0.99"}} {interaction["step_ms_p99"]:.3f}',
            "# TYPE interplay_late_chunks gauge", f"interplay_late_chunks {interaction['late_chunks']}",
            "# TYPE interplay_missing_chunks gauge", f"interplay_missing_chunks {interaction['missing_chunks']}",
        ]
        for key, value in sorted(interaction["totals"].items()):
            lines += [f"# TYPE interplay_{key}_total counter", f"interplay_{key}_total {value}"]
        for key, value in sorted(ingress.items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines += [f"# TYPE interplay_ingress_{key} gauge", f"interplay_ingress_{key} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def check_origin(self, headers) -> None:
        """403 for a browser page that may not call here (see `origin_allowed`)."""
        if not origin_allowed(headers.get("origin"), headers.get("host"), self.config.auth.allowed_origins):
            raise HttpError(403, "this page's origin may not call this server (see auth.allowed_origins)", "forbidden_origin")

    @answers
    async def client_secrets(self, request: Request) -> JSONResponse:
        """A short-lived secret for a browser, in the Realtime API's shape; the `session` given is
        validated and bound to it, so calls made with the secret get that config (as a ceiling),
        and count against the minting key's quotas."""
        self.check_origin(request.headers)
        tenant = self.auth.check_api_key(request.headers.get("authorization"))
        body = await read_body(request, self.limits.max_secret_body_bytes, self.limits.body_timeout_s)
        raw = parse_json(body) if body.strip() else {}
        try:
            ask = SecretRequest.model_validate(raw)
        except ValidationError as exc:
            raise HttpError(400, validation_message(exc), "invalid_value") from None
        config = session_config(ask.session) if ask.session is not None else None
        ttl = self.config.auth.client_secret_ttl_s
        if ask.expires_after is not None:
            ttl = min(ask.expires_after.seconds, self.limits.max_secret_ttl_s)
        try:
            secret = self.auth.mint(ttl, config, tenant)
        except ValueError as exc:  # too large to ride in a header
            raise HttpError(400, clean(str(exc)), "invalid_value", "session") from None
        return JSONResponse({**secret, "session": config if config is not None else {}})

    @answers
    async def calls(self, request: Request) -> Response:
        """The Realtime WebRTC flow: an SDP offer in (raw application/sdp, or multipart with
        `sdp` and `session` fields), the SDP answer out with 201 and the call's Location. A secret
        with a bound config gives the call that config; an offer's own that differs is refused."""
        self.check_origin(request.headers)
        grant = self.auth.check(request.headers.get("authorization"))
        body = await read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
        sdp, session = await _offer_parts(request, body)
        config = self._config_for(grant, session)
        # Finished even if the client drops meanwhile (the call then never connects and times
        # out): an offer cut short could leave its session joined on the interaction side.
        answer = await asyncio.shield(detached(self.ingress.offer(sdp, config, owner=grant.owner, tenant=grant.tenant, ceiling=grant.config)))
        call_id = answer["session_id"]
        return Response(answer["sdp"], status_code=201, media_type="application/sdp", headers={"Location": f"/v1/realtime/calls/{call_id}"})

    @answers
    async def hangup(self, call_id: str, request: Request) -> Response:
        """End a call: an API key holder any call, a secret's holder only the calls it made (even
        after the secret expired)."""
        self.check_origin(request.headers)
        grant = self.auth.check(request.headers.get("authorization"), allow_expired=True)
        if len(call_id) > MAX_CALL_ID_CHARS:
            raise HttpError(404, "no such call", "unknown_session", "call_id")
        await asyncio.shield(detached(self.ingress.close(call_id, owner=grant.owner)))
        return Response(status_code=200)

    async def realtime(self, ws: WebSocket) -> None:

        try:
            await serve_websocket(ws, self.auth, self.websockets, self.config.auth.allowed_origins)
        except Exception:  # serve_websocket ends its own session; nothing more to tell the client
            log.exception("websocket handler failed")

    @staticmethod
    def _config_for(grant: Grant, session: Any) -> dict | None:
        if session is None:
            return grant.config
        config = session_config(session)
        if grant.config is not None and config != grant.config:
            raise HttpError(400, "the offer's session differs from the one bound to its client secret: leave it out", "invalid_value", "session")
        return config


def make_api(edge: Edge) -> FastAPI:
    """The FastAPI app of `edge`'s routes, whose every error is the JSON error shape."""
    api = FastAPI(title="Interplay", docs_url=None, redoc_url=None, openapi_url=None)
    api.add_api_route("/", edge.page, methods=["GET"])
    api.add_api_route("/healthz", edge.healthz, methods=["GET"])
    api.add_api_route("/metrics", edge.metrics, methods=["GET"])
    api.add_api_route("/v1/realtime/client_secrets", edge.client_secrets, methods=["POST"])
    api.add_api_route("/v1/realtime/calls", edge.calls, methods=["POST"])
    api.add_api_route("/v1/realtime/calls/{call_id}/hangup", edge.hangup, methods=["POST"])
    api.add_api_websocket_route("/v1/realtime", edge.realtime)

    @api.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code >= 500:
            return api_error(503, UNAVAILABLE, "unavailable")
        names = {404: ("not found", "not_found"), 405: ("method not allowed", "method_not_allowed")}
        message, code = names.get(exc.status_code, ("invalid request", "invalid_request"))
        return api_error(exc.status_code, message, code)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return api_error(400, "invalid request", "invalid_request")

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", exc_info=exc)
        return api_error(503, UNAVAILABLE, "unavailable")

    return api


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class Gateway:
    """HTTP and WebSocket edge. Calls live in the ingress actors (the least loaded takes a new
    one); WebSocket sessions live in this replica's own `Ingress`, next to their socket, placed by
    the router like every session, so their audio and events cross no extra actor hop and the
    replica exchanges once per tick with each interaction actor its sessions are on."""

    def __init__(self, config: dict, signing_key: bytes, router: ActorHandle, ingresses: list[ActorHandle], clock: dict):
        from actors.ingress.ingress import Ingress

        from .fleet import Ingresses, Interactions

        settings = AppConfig.model_validate(config)
        auth = Auth(settings.auth.keys(), signing_key, settings.auth.client_secret_ttl_s)
        routing = cast(Routing, Remote(router, Routing))  # a Remote answers what its port declares
        websockets = Ingress(routing, TickClock.from_dict(clock), **settings.ingress_kwargs())
        self.edge = Edge(settings, auth, Interactions(routing), Ingresses([Remote(h, IngressPort) for h in ingresses]), websockets)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.edge)
