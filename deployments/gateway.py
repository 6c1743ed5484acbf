"""The HTTP and WebSocket edge: the Serve deployment `Gateway` and its FastAPI routes.

`POST /v1/realtime/calls` (SDP offer in, answer out; the call lives in an ingress actor),
`POST /v1/realtime/calls/{id}/hangup`, `POST /v1/realtime/client_secrets`, the WebSocket
`/v1/realtime` (sessions in the replica's own in-process `Ingress`), `GET /` (the browser page),
`/healthz` and `/metrics`. `deployments.app.build` binds it to the actors' handles.
"""

# No postponed annotations in this module: FastAPI reads the routes' parameter types.

import json
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.actor import ActorHandle

from actors.remote import Remote
from protocols import ProtocolError, TickClock

from .auth import Auth, AuthError
from .config import AppConfig

WEB_DIR = Path(__file__).resolve().parents[1] / "examples" / "web"
MAX_SDP_BYTES = 64 * 1024
HTTP_STATUS = {"capacity": 503, "unauthorized": 401}

api = FastAPI(title="Interplay", docs_url=None, redoc_url=None)


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_request_error", "code": code, "message": message}}, status_code=status)


async def _read_offer(request: Request, body: bytes) -> tuple[str, dict | None]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form()
        sdp, session = form.get("sdp"), form.get("session")
        if not isinstance(sdp, str):
            raise ProtocolError("multipart offer needs an 'sdp' field", "invalid_sdp", "sdp")
        try:
            return sdp, json.loads(session) if isinstance(session, str) and session else None
        except ValueError:
            raise ProtocolError("'session' must be JSON", "invalid_json", "session") from None
    if kind not in ("application/sdp", "text/plain", ""):
        raise ProtocolError(f"unsupported content type {kind!r}; send application/sdp", "invalid_sdp")
    try:
        return body.decode("utf-8"), None
    except UnicodeDecodeError:
        raise ProtocolError("offer is not UTF-8 text", "invalid_sdp") from None


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Gateway:
    """HTTP and WebSocket edge. Calls live in the ingress actor; WebSocket sessions live in this
    replica's own `Ingress`, next to their socket, so their audio and events cross no extra actor
    hop and the replica exchanges once per tick for all of them."""

    def __init__(self, config: dict, signing_key: bytes, interaction: ActorHandle, ingress: ActorHandle, clock: dict):
        from actors.ingress import Ingress

        self.config = AppConfig.model_validate(config)
        self.auth = Auth(self.config.auth.keys(), signing_key, self.config.auth.client_secret_ttl_s)
        self.interaction = Remote(interaction)
        self.ingress = Remote(ingress)
        jitter_ms, prebuffer_ms = self.config.margins_ms()
        self.websockets = Ingress(
            self.interaction, TickClock.from_dict(clock), max_sessions=self.config.interaction.max_sessions,
            jitter_ms=jitter_ms, prebuffer_ms=prebuffer_ms,
        )

    @api.get("/")
    async def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            stats = await self.interaction.stats()
            await self.ingress.stats()
        except Exception as exc:  # an actor is down: the deployment is not healthy
            return _error(503, f"unhealthy: {exc}", "unhealthy")
        return JSONResponse({"status": "ok", "sessions": stats["sessions"], "tick": stats["tick"]})

    @api.get("/metrics")
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

    @api.post("/v1/realtime/client_secrets")
    async def client_secrets(self, request: Request) -> JSONResponse:
        try:
            self.auth.check_api_key(request.headers.get("authorization"))
        except AuthError as exc:
            return _error(exc.status, str(exc), "unauthorized")
        body = await request.body()
        session = {}
        if body:
            try:
                session = json.loads(body).get("session", {}) or {}
            except (ValueError, AttributeError):
                return _error(400, "body must be a JSON object", "invalid_json")
        return JSONResponse({**self.auth.mint(), "session": session})

    @api.post("/v1/realtime/calls")
    async def calls(self, request: Request) -> Response:
        """The Realtime WebRTC flow: an SDP offer in (raw application/sdp, or multipart with
        `sdp` and `session` fields), the SDP answer out with 201 and the call's Location."""
        try:
            self.auth.check(request.headers.get("authorization"))
        except AuthError as exc:
            return _error(exc.status, str(exc), "unauthorized")
        body = await request.body()
        if len(body) > MAX_SDP_BYTES:
            return _error(400, f"offer larger than {MAX_SDP_BYTES} bytes", "invalid_sdp")
        try:
            sdp, session = await _read_offer(request, body)
            answer = await self.ingress.offer(sdp, session)
        except ProtocolError as exc:
            return _error(HTTP_STATUS.get(exc.code, 400), str(exc), exc.code)
        call_id = answer["session_id"]
        return Response(answer["sdp"], status_code=201, media_type="application/sdp", headers={"Location": f"/v1/realtime/calls/{call_id}"})

    @api.post("/v1/realtime/calls/{call_id}/hangup")
    async def hangup(self, call_id: str, request: Request) -> Response:
        try:
            self.auth.check(request.headers.get("authorization"))
            await self.ingress.close(call_id)
        except AuthError as exc:
            return _error(exc.status, str(exc), "unauthorized")
        except ProtocolError as exc:
            return _error(404, str(exc), exc.code)
        return Response(status_code=200)

    @api.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        from .websocket import serve_websocket

        await serve_websocket(ws, self.auth, self.websockets)


