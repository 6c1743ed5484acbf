"""The Serve application and the actors behind it, brought up by `start(config)`.

`start` creates the named actors (session log, interaction, ingress) and runs the Serve app: the
HTTP gateway with `POST /v1/realtime/calls` (SDP offer in, answer out), `POST
/v1/realtime/client_secrets`, the WebSocket `/v1/realtime`, `GET /` (the browser page),
`/healthz` and `/metrics`. The gateway finds the actors by name, so its replicas hold no state.
"""


import json
import secrets
import time
from pathlib import Path

import ray
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from ray import serve

from protocols import ProtocolError

from .auth import Auth, AuthError
from .config import AppConfig

NAMESPACE = "interplay"
LOG_NAME = "session_log"
INTERACTION_NAME = "interaction"
INGRESS_NAME = "ingress"
APP_NAME = "interplay"
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
    """HTTP and WebSocket edge. Holds no session state: calls live in the ingress actors."""

    def __init__(self, config: dict, signing_key: bytes):
        self.config = AppConfig.model_validate(config)
        self.auth = Auth(self.config.auth.keys(), signing_key, self.config.auth.client_secret_ttl_s)
        self.ingress = ray.get_actor(INGRESS_NAME, namespace=NAMESPACE)
        self.interaction = ray.get_actor(INTERACTION_NAME, namespace=NAMESPACE)
        # WebSocket sessions live in this replica's own ingress, next to their socket: audio and
        # events then cross no extra actor hop, and the replica exchanges once per tick for all.
        from actors.ingress import InteractionIngress

        jitter_ms, prebuffer_ms = self.config.margins_ms()
        self.websockets = InteractionIngress(
            self.interaction, NAMESPACE, self.config.interaction.max_sessions, jitter_s=jitter_ms / 1000, prebuffer_ms=prebuffer_ms,
        )

    @api.get("/")
    async def page(self) -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            stats = await self.interaction.stats.remote()
            await self.ingress.stats.remote()
        except Exception as exc:  # an actor is down: the deployment is not healthy
            return _error(503, f"unhealthy: {exc}", "unhealthy")
        return JSONResponse({"status": "ok", "sessions": stats["sessions"], "tick": stats["tick"]})

    @api.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        interaction = await self.interaction.stats.remote()
        ingress = await self.ingress.stats.remote()
        lines = [
            "# TYPE interplay_sessions gauge", f"interplay_sessions {interaction['sessions']}",
            "# TYPE interplay_tick counter", f"interplay_tick {interaction['tick']}",
            "# TYPE interplay_step_ms gauge",
            f'interplay_step_ms{{quantile="0.5"}} {interaction["step_ms_p50"]:.3f}',
            f'interplay_step_ms{{quantile="0.99"}} {interaction["step_ms_p99"]:.3f}',
            "# TYPE interplay_late_chunks gauge", f"interplay_late_chunks {interaction['late_chunks']}",
            "# TYPE interplay_missing_chunks gauge", f"interplay_missing_chunks {interaction['missing_chunks']}",
        ]
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
            answer = await self.ingress.offer.remote(sdp, session)
        except ProtocolError as exc:
            return _error(HTTP_STATUS.get(exc.code, 400), str(exc), exc.code)
        call_id = answer["session_id"]
        return Response(answer["sdp"], status_code=201, media_type="application/sdp", headers={"Location": f"/v1/realtime/calls/{call_id}"})

    @api.post("/v1/realtime/calls/{call_id}/hangup")
    async def hangup(self, call_id: str, request: Request) -> Response:
        try:
            self.auth.check(request.headers.get("authorization"))
            await self.ingress.close.remote(call_id)
        except AuthError as exc:
            return _error(exc.status, str(exc), "unauthorized")
        except ProtocolError as exc:
            return _error(404, str(exc), exc.code)
        return Response(status_code=200)

    @api.websocket("/v1/realtime")
    async def realtime(self, ws: WebSocket) -> None:
        from .websocket import serve_websocket

        await serve_websocket(ws, self.auth, self.websockets)


# --- bringing it up ---------------------------------------------------------------------------


def start(config: AppConfig) -> dict[str, str]:
    """Create the actors and run the Serve app on a connected Ray cluster; returns each part's status."""
    from actors.ingress import IngressActor
    from actors.interaction import InteractionActor
    from actors.session_log import start_session_log

    parts: dict[str, str] = {}
    t = time.monotonic()
    start_session_log(config.log.root, name=LOG_NAME, namespace=NAMESPACE, detached=True, retention_s=config.log.retention_s)
    parts["session_log"] = f"up ({config.log.root}, retention {config.log.retention_s:.0f} s) in {time.monotonic() - t:.1f} s"

    t = time.monotonic()
    gpu = ray.cluster_resources().get("GPU", 0) >= 1 and config.model.device in ("auto", "cuda")
    interaction = InteractionActor.options(
        name=INTERACTION_NAME, namespace=NAMESPACE, num_gpus=1 if gpu else 0, get_if_exists=True, lifetime="detached"
    ).remote(config.model_dump(), LOG_NAME)
    clock = ray.get(interaction.ready.remote())
    parts["interaction"] = f"up ({config.model.preset} on {'GPU' if gpu else 'CPU'}, clock t0={clock['t0']:.3f}) in {time.monotonic() - t:.1f} s"

    t = time.monotonic()
    # A server bound to loopback keeps its WebRTC media on loopback too (aioice skips 127.0.0.1).
    ice = config.ingress.ice_addresses or (["127.0.0.1"] if config.loopback else None)
    jitter_ms, prebuffer_ms = config.margins_ms()
    ingress = IngressActor.options(name=INGRESS_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote(
        INTERACTION_NAME, NAMESPACE, config.interaction.max_sessions, ice_addresses=ice, clock=clock,
        jitter_s=jitter_ms / 1000, prebuffer_ms=prebuffer_ms,
    )
    ray.get(ingress.stats.remote())
    parts["ingress"] = f"up (margins: jitter {jitter_ms:.0f} ms, playout {prebuffer_ms:.0f} ms) in {time.monotonic() - t:.1f} s"

    t = time.monotonic()
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    signing_key = secrets.token_bytes(32)
    serve.run(Gateway.bind(config.model_dump(), signing_key), name=APP_NAME, route_prefix="/")
    parts["http"] = f"up at http://{config.http.host}:{config.http.port}/ in {time.monotonic() - t:.1f} s"
    return parts


def status() -> dict[str, str]:
    """Each part's state on a running deployment (the caller has connected to Ray)."""
    out: dict[str, str] = {}
    for name in (LOG_NAME, INTERACTION_NAME, INGRESS_NAME):
        try:
            ray.get_actor(name, namespace=NAMESPACE)
            out[name] = "alive"
        except ValueError:
            out[name] = "absent"
    try:
        out["http"] = str(serve.status().applications.get(APP_NAME).status)
    except Exception:
        out["http"] = "absent"
    return out


def stop() -> None:
    serve.shutdown()
    for name in (INGRESS_NAME, INTERACTION_NAME, LOG_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
