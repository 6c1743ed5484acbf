"""The Realtime API over a WebSocket (`/v1/realtime`), as the official clients speak it.

The socket's Origin is checked first (`deployments.auth.origin_allowed`: a page elsewhere could
otherwise drive a session from the visitor's browser), then it is authenticated (an
`Authorization: Bearer` header, or for browsers, which cannot set headers, the
`openai-insecure-api-key.<key>` subprotocol; the accepted subprotocol is `realtime` when offered,
else none, so the key is never echoed back in a header), then becomes one session of the
gateway's own ingress (an in-process `Ingress`, bound to the interaction side like the actor is):
client messages go to `Ingress.receive`, and the session's events (audio as base64 PCM16 deltas)
go back from its outbox until either side ends it.

Once `open_websocket` has made the session, it is closed whatever happens next: the accept
failing, the client gone at any step, a send or receive raising, this handler cancelled. A client
message whose handling raises gets an `error` event, and the session goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from typing import Sequence

from fastapi import WebSocket
from fastapi.responses import JSONResponse

from protocols import ProtocolError
from protocols.realtime_events import error_event

from .auth import Auth, AuthError, Grant, origin_allowed
from .errors import HTTP_STATUS, UNAVAILABLE, clean

log = logging.getLogger("interplay.websocket")

KEY_PROTOCOL = "openai-insecure-api-key."
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
FLUSH_S = 1.0  # how long what the session said last may take to leave once it ended


def _credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """The Authorization header to check, and the subprotocol to accept (if the key came as one)."""
    header = ws.headers.get("authorization")
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    keyed = next((p for p in offered if p.startswith(KEY_PROTOCOL)), None)
    if header is None and keyed is not None:
        header = f"Bearer {keyed[len(KEY_PROTOCOL):]}"
    accept = "realtime" if "realtime" in offered else None  # never the key: it would be echoed back
    return header, accept


async def _refuse(ws: WebSocket, status: int, message: str, code: str) -> None:
    body = JSONResponse({"error": {"type": "invalid_request_error", "code": code, "message": message}}, status_code=status)
    try:
        await ws.send_denial_response(body)  # a real HTTP status, where the server supports it
    except Exception:
        try:
            await ws.close(code=POLICY_VIOLATION if status in (401, 403) else TRY_AGAIN_LATER, reason=message[:120])
        except Exception:
            pass  # the client is gone already


async def serve_websocket(ws: WebSocket, auth: Auth, ingress, allowed_origins: Sequence[str] = ()) -> None:
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), list(allowed_origins)):
        await _refuse(ws, 403, "this page's origin may not call this server (see auth.allowed_origins)", "forbidden_origin")
        return
    header, subprotocol = _credentials(ws)
    try:
        grant = auth.check(header)
    except AuthError as exc:
        await _refuse(ws, exc.status, clean(str(exc)), "unauthorized")
        return
    try:
        session_id, outbox = await _open(ingress, grant)
    except ProtocolError as exc:
        await _refuse(ws, HTTP_STATUS.get(exc.code, 400), clean(str(exc)), exc.code)
        return
    except Exception:
        log.exception("could not open a websocket session")
        await _refuse(ws, 503, UNAVAILABLE, "unavailable")
        return
    try:
        await ws.accept(subprotocol=subprotocol)
        await _converse(ws, ingress, session_id, outbox)
    except Exception as exc:  # the client went away mid-handshake or mid-send: nothing to tell it
        log.debug("websocket %s ended: %r", session_id, exc)
    finally:
        await _end(ingress, session_id)
        try:
            await ws.close()
        except Exception:
            pass


def detached(coro) -> asyncio.Task:
    """`coro` as a task outside this request's context. Serve cancels a dropped request, and Ray
    with it the actor calls the request made (they are its child tasks), wherever they are: a join
    cut short on the interaction side can leave a session joined there that nobody leaves."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


async def _open(ingress, grant: Grant) -> tuple[str, asyncio.Queue]:
    """`ingress.open_websocket`, finished even if this handler is cancelled meanwhile, in which
    case the session it made is closed when it is made."""
    opening = detached(ingress.open_websocket(grant.config, owner=grant.owner, tenant=grant.tenant, ceiling=grant.config))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        def close_it(task: asyncio.Future) -> None:
            if not task.cancelled() and task.exception() is None:
                detached(_end(ingress, task.result()[0]))

        opening.add_done_callback(close_it)
        raise


async def _end(ingress, session_id: str) -> None:
    try:
        await asyncio.shield(detached(ingress.close(session_id)))
    except ProtocolError:
        pass  # it ended already
    except Exception:
        log.exception("closing websocket session %s failed", session_id)


async def _converse(ws: WebSocket, ingress, session_id: str, outbox: asyncio.Queue) -> None:
    """Client messages in, the session's events out, until either side ends: the client's
    disconnect ends the session; the session's end (None in the outbox) ends the socket."""
    sender = asyncio.create_task(_send(ws, outbox))
    receiver = asyncio.create_task(_receive(ws, ingress, session_id, outbox))
    try:
        await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        receiver.cancel()
        if not sender.done():
            await _end(ingress, session_id)  # puts the end mark behind what the session said last
            try:
                await asyncio.wait_for(sender, FLUSH_S)
            except BaseException:
                pass
    finally:
        for task in (sender, receiver):
            task.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


async def _send(ws: WebSocket, outbox: asyncio.Queue) -> None:
    while (text := await outbox.get()) is not None:
        await ws.send_text(text)


async def _receive(ws: WebSocket, ingress, session_id: str, outbox: asyncio.Queue) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text") if message.get("text") is not None else message.get("bytes")
        try:
            ingress.receive(session_id, data if data is not None else "")
        except ProtocolError as exc:
            if exc.code == "unknown_session":  # the session ended under it
                return
            _tell(outbox, error_event(_clean(exc), exc.code, exc.param))
        except Exception:
            log.exception("handling a message of websocket session %s failed", session_id)
            _tell(outbox, error_event("the server could not handle this event; the session goes on", "server_error", type="server_error"))


def _clean(exc: Exception) -> str:
    return clean(str(exc))


def _tell(outbox: asyncio.Queue, event: dict) -> None:
    try:
        outbox.put_nowait(json.dumps(event))
    except asyncio.QueueFull:
        log.warning("websocket client is not reading; dropping an error event")
