"""The Realtime API over a WebSocket (`/v1/realtime`), as the official clients speak it.

The socket is authenticated (an `Authorization: Bearer` header, or for browsers, which cannot
set headers, the `openai-insecure-api-key.<key>` subprotocol), then becomes one session of the
gateway's own ingress (an in-process `Ingress`, bound to the interaction side like the actor is):
client messages go to `Ingress.receive`, and the session's events (audio as base64 PCM16 deltas)
go back from its outbox until either side ends it.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from actors.ingress import Ingress
from protocols import ProtocolError
from protocols.realtime import error_from

from .auth import Auth, AuthError

log = logging.getLogger("interplay.websocket")

KEY_PROTOCOL = "openai-insecure-api-key."
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013


def _credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """The Authorization header to check, and the subprotocol to accept (if the key came as one)."""
    header = ws.headers.get("authorization")
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    keyed = next((p for p in offered if p.startswith(KEY_PROTOCOL)), None)
    if header is None and keyed is not None:
        header = f"Bearer {keyed[len(KEY_PROTOCOL):]}"
    accept = "realtime" if "realtime" in offered else keyed
    return header, accept


async def _refuse(ws: WebSocket, status: int, message: str, code: str) -> None:
    body = JSONResponse({"error": {"type": "invalid_request_error", "code": code, "message": message}}, status_code=status)
    try:
        await ws.send_denial_response(body)  # a real HTTP status, where the server supports it
    except Exception:
        await ws.close(code=POLICY_VIOLATION if status == 401 else TRY_AGAIN_LATER, reason=message[:120])


async def serve_websocket(ws: WebSocket, auth: Auth, ingress: Ingress) -> None:
    header, subprotocol = _credentials(ws)
    try:
        auth.check(header)
    except AuthError as exc:
        await _refuse(ws, exc.status, str(exc), "unauthorized")
        return
    try:
        session_id, outbox = await ingress.open_websocket(None)
    except ProtocolError as exc:
        await _refuse(ws, 503 if exc.code == "capacity" else 400, str(exc), exc.code)
        return
    await ws.accept(subprotocol=subprotocol)

    async def pump() -> None:
        while (text := await outbox.get()) is not None:
            await ws.send_text(text)

    sender = asyncio.create_task(pump())
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                ingress.receive(session_id, data)
            except ProtocolError as exc:  # the session already ended under it
                await ws.send_json(error_from(exc))
                break
    except WebSocketDisconnect:
        pass
    finally:
        try:
            await ingress.close(session_id)
        except ProtocolError:
            pass
        try:
            await asyncio.wait_for(sender, 1.0)  # flush what the session said last
        except Exception:
            sender.cancel()
        try:
            await ws.close()
        except Exception:
            pass
