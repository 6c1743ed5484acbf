"""The deployment as data: `plan(config, resources)` lists every actor of the live path, in the
order they come up (session log, the background pool's driver when configured, the interaction
actors, the router, the ingress actors), each an `ActorSpec` (role, name, class, arguments, Ray
options) whose arguments name the actors before it by `Ref`. `deployments.app.build` (the
`interplay serve` command, tests, benches) and `deployments.app.serve_app` (a Serve config, the
RayService) carry out the same plan, each choosing only how to create the actors and what to wait
for; the gateway's in-process WebSocket `Ingress` takes the same `AppConfig.ingress_kwargs` as
the ingress actors.

What each part asks of Ray (`actor_options`, `deployments.pool.asks`) is a share for placement
sized to its work, not a core: on a plain 2-CPU machine the live path asks 0.55 CPU (log 0.1,
driver 0.1, ingress 0.25, gateway 0.1 a replica; the interaction actors and router none) and a
pool replica 1.25 (its server 0.25, its vLLM engine 1), so the defaults fit in 1.8.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping

from actors.background.background import BackgroundActor, RemotePool
from actors.interaction.interaction import EngineSpec, InteractionActor
from actors.interaction.router import RouterActor
from actors.log.log_actor import SessionLogActor
from actors.remote import Remote
from protocols.ports import Interaction, Log, Placement

from .config import AppConfig
from .fleet import InteractionFleet, units
from .pool import SPEECH_APP
from .spec import ActorSpec, Ref, StartupError

ROLES = ("session_log", "background", "interaction", "router", "ingress")  # the actors, in the order they come up
# A restarted actor runs its constructor again with the same arguments: the interaction actors'
# clock origin is one of them, so a restart keeps every tick where it was.
RESTART = {"max_restarts": -1, "max_task_retries": 0}
# The Ray CPUs the light actors ask for: the log appends Arrow batches and writes Parquet; the
# pool's driver renders prompts, runs tools and transcribes speech; an ingress decodes and
# encodes its calls' Opus audio (the gateway's replicas ask 0.1 each, deployments/gateway.py).
CPU_SHARES = {"session_log": 0.1, "background": 0.1, "ingress": 0.25}
# Filled in by whoever carries the plan out: the clock origin the interaction actors share, the
# clock the first of them publishes, and the creator's own creation options (for the router's
# fleet, which makes more interaction actors later, as the creator would).
T0, CLOCK, HOW = Ref("t0"), Ref("clock"), Ref("how")


def plan(config: AppConfig, resources: Mapping[str, float]) -> list[ActorSpec]:
    """The live path's actors for `config` on a cluster offering `resources` (its totals), in
    bring-up order; StartupError when the config cannot be served as it is."""
    from actors.ingress.ingress import IngressActor

    exposed = config.exposure_error()
    if exposed:
        raise StartupError(exposed)
    tick_ms = model_tick_ms(config)
    options = {role: {**RESTART, **o} for role, o in actor_options(config, resources).items()}
    specs = [ActorSpec("session_log", "session_log", SessionLogActor, (_absolute(config.log.root),),
                       {"tick_ms": tick_ms, "retention_s": config.log.retention_s, "keep_s": config.log.keep_s}, options["session_log"])]
    if config.background.active():  # the driver is light; its pool is deployed apart (deployments.pool)
        from .pool import PoolChat

        specs.append(ActorSpec("background", "background", BackgroundActor, (PoolChat(config.background.model_id),),
                               background_options(config, Ref("session_log")), options["background"]))
    fleet = interaction_fleet(config, options["interaction"], background=config.background.active())
    names = [f"interaction-{i}" for i in range(fleet.units(resources))]
    specs += [fleet.template.named(name) for name in names]
    placed = {name: (Ref(name, partial(Remote, port=Interaction)), fleet.max_sessions, Ref(name)) for name in names}
    specs.append(ActorSpec("router", "router", RouterActor, (placed,),
                           {"grow": None if fleet.fixed else fleet, "sessions_per_tenant": config.limits.sessions_per_key}, options["router"]))
    ingress = {**config.ingress_kwargs(), "ice_addresses": config.ice_addresses()}
    specs += [ActorSpec("ingress", f"ingress-{i}", IngressActor, (Ref("router", partial(Remote, port=Placement)), CLOCK), ingress, options["ingress"])
              for i in range(config.ingress.actors)]
    return specs


def interaction_fleet(config: AppConfig, options: dict, background: bool) -> InteractionFleet:
    """The interaction actors' maker: their spec (on the shared clock origin `T0`) and how many."""
    kwargs = {
        "log": Ref("session_log", partial(Remote, port=Log)), "background": Ref("background", RemotePool) if background else None,
        "grace_ms": config.interaction.grace_ms, "max_sessions": config.interaction.max_sessions, "t0": T0,
        "snapshot_s": config.interaction.snapshot_s,
        "task_starts_per_s": config.limits.task_starts_per_minute / 60, "task_burst": config.limits.task_burst,
    }
    template = ActorSpec("interaction", "interaction-0", InteractionActor, (engine_spec(config),), kwargs, options)
    return InteractionFleet(template, config.interaction.max_sessions, fixed=config.interaction.actors, how=HOW)


def model_tick_ms(config: AppConfig) -> int:
    """The tick length of the configured model; StartupError if `interaction.tick_ms` says otherwise."""
    spec = engine_spec(config)
    source = (f"Moshi-family checkpoint {spec.path}" if spec.family == "moshi"
              else f"checkpoint {spec.checkpoint}" if spec.checkpoint else f"preset {spec.preset!r}")
    try:
        tick_ms = spec.tick_ms()
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
    return EngineSpec(family=m.family, path=m.path, frames_per_tick=m.frames_per_tick, preset=m.preset, checkpoint=m.checkpoint,
                      device=m.device, max_sessions=config.interaction.max_sessions, onset_margin=m.onset_margin,
                      sampling=m.sampling.model_dump() if m.sampling else None)


def actor_options(config: AppConfig, resources: Mapping[str, float]) -> dict[str, dict]:
    """What each actor asks of a cluster offering `resources` (its totals): the interaction actor a
    GPU when there is one (and the model may use it), and each actor its role's custom resource
    (`session_log`, `router`, `interaction`, `ingress`) where the cluster defines it, which pins it
    to the node type meant for it (see cluster.yaml): the router's map of placements, like the
    log, lives on the head, never on a node that may leave with the calls it places. The pool's
    driver (`background`) asks for no node type: it is light (prompts, tools, the sandbox, speech
    recognition), and its LLM replicas ask for the `background` resource themselves
    (deployments/pool.py). Each asks a CPU share sized to its work (`CPU_SHARES`): an actor that
    names none would need a whole free CPU to be placed (and again to be restarted), and one that
    names only a custom resource would hold a CPU."""
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


def interaction_units(config: AppConfig, resources: Mapping[str, float]) -> int:
    """How many interaction actors the plan makes on a cluster offering `resources`."""
    return units(actor_options(config, resources)["interaction"], config.interaction.actors, resources)


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


def background_options(config: AppConfig, log: Any, speech_handle: object = None) -> dict:
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


def _absolute(root: str) -> str:
    """A local log root as an absolute path: the actor's working directory is not the caller's."""
    return root if "://" in root else str(Path(root).expanduser().resolve())
