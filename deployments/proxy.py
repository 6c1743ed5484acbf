"""What Serve's HTTP proxy is set up with before it listens: the WebSocket frame cap.

Serve's proxy runs uvicorn with its default WebSocket `ws_max_size` (16 MiB) and offers no option
for it, so a client could make the proxy buffer a 16 MiB frame before any of our checks run. Serve
does call a function named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in the proxy's process
before it starts its server: `configure` is that function. It gives every uvicorn server made in
that process our cap (`INTERPLAY_WS_MAX_BYTES`, default `WS_MAX_BYTES`), which the WebSocket
library enforces from the frame's header, before the frame is read; a larger frame closes the
socket with 1009 (message too big). It returns no middlewares.

`interplay serve` sets the variable for the cluster it starts; a cluster started otherwise (`ray
start`, KubeRay) needs it in the environment of its nodes (see deployments/k8s/rayservice.yaml).
Events under the cap but over the per-event limit (`actors.ingress.transports.MAX_CHANNEL_EVENT_BYTES`)
still get an `error` event and the session goes on.
"""

from __future__ import annotations

import functools
import os

CALLBACK = "deployments.proxy:configure"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
WS_MAX_BYTES = 1024 * 1024


def ws_max_bytes() -> int:
    return int(os.environ.get("INTERPLAY_WS_MAX_BYTES", WS_MAX_BYTES))


def configure() -> list:
    import uvicorn.config

    init = uvicorn.config.Config.__init__
    if not getattr(init, "interplay_capped", False):
        cap = ws_max_bytes()

        def capped(self, *args, **kwargs):
            kwargs.setdefault("ws_max_size", cap)
            init(self, *args, **kwargs)

        functools.update_wrapper(capped, init)
        setattr(capped, "interplay_capped", True)
        uvicorn.config.Config.__init__ = capped
    return []


def use_in_cluster() -> None:
    """Name `configure` for the proxy of a cluster this process is about to start."""
    os.environ.setdefault(ENV, CALLBACK)
