"""The background pool's Serve applications, started after the live path and followed until they
run: `start_background` deploys them without waiting, `follow` reports their progress and leaves
off (deletes) one that fails or is not placed within the timeout, so the live path never waits on
a pool that is slow to start or cannot be placed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray import serve

from .config import BackgroundSection
from .pool import POOL_APP, SPEECH_APP, asks, deploy, pool_model, source, speech_model


@dataclass
class Starting:
    """A Serve application started after the live path and not yet seen running."""

    part: str  # its line in `App.parts`
    app_name: str
    label: str  # how its progress lines name it
    asks: dict[str, float]  # the Ray resources its first replicas ask for in all
    detail: str  # what it runs, for its status line
    t0: float = field(default_factory=time.monotonic)


def start_background(section: BackgroundSection) -> tuple[dict[str, Any], list[Starting]]:
    """Deploy the pool's LLM (Serve LLM, autoscaling on its own) and, with the whisper speech
    engine, the Whisper model beside it, without waiting: their handles by Serve app name, and
    what `follow` follows."""
    resources = ray.cluster_resources()
    wanted = asks(section, resources)
    handles = deploy(section, resources)
    path, load_format = source(pool_model(section))
    heard = f"speech as {section.speech.mode}" + (f" by {section.speech.engine}" if section.speech.mode == "transcript" else "")
    starting = [Starting(
        "background", POOL_APP, "background pool", wanted[POOL_APP],
        f"{path}, load_format={load_format}; Serve app {POOL_APP}, {section.min_replicas}..{section.max_replicas} replicas; {heard}",
    )]
    if SPEECH_APP in handles:
        path, load_format = source(speech_model(section))
        starting.append(Starting("speech", SPEECH_APP, "speech (Whisper)", wanted[SPEECH_APP], f"{path}, load_format={load_format}; Serve app {SPEECH_APP}"))
    return handles, starting


def follow(starting: list[Starting], parts: dict[str, str], timeout_s: float, say: Callable[[str], None] | None = None,
           every_s: float = 10.0) -> set[str]:
    """Follow the applications in `starting` (taking each out once it is done) until each runs,
    fails, or has not been placed within `timeout_s` (then it is deleted: left off); each one's
    outcome becomes its line in `parts`. `say(line)` gets a progress line every `every_s`
    ("background pool: waiting for resources ... (asks X CPU, cluster has Y free)", or "starting"
    once placed) and each outcome, "<part> <its line>". A placed replica is waited for until
    Serve reports it running or failed. Returns the parts that did not come up."""
    say = say or (lambda line: None)
    next_say = time.monotonic() + every_s
    failed: set[str] = set()
    while starting:
        states = serve.status().applications
        now = time.monotonic()
        for s in list(starting):
            state = states.get(s.app_name)
            status = str(getattr(state.status, "value", state.status)) if state is not None else "DEPLOYING"
            placed = _placed(s.app_name)
            line = None
            if status == "RUNNING":
                line = f"up ({s.detail}) in {now - s.t0:.1f} s"
            elif status not in ("DEPLOYING", "NOT_STARTED"):
                line = f"failed ({status.lower()}): {_short(state.message if state else '')}; left off, background tasks get an error"
                _delete(s.app_name)
            elif not placed and now - s.t0 > timeout_s:
                line = (f"could not be placed in {timeout_s:.0f} s ({_resources_line(s.asks)}); left off, background tasks get an "
                        f"error. Free resources or lower background.num_cpus / engine_cpus")
                _delete(s.app_name)
            elif now >= next_say:
                say(f"{s.label}: " + (f"starting (placed; {now - s.t0:.0f} s)" if placed else f"waiting for resources ... ({_resources_line(s.asks)})"))
            if line is not None:
                parts[s.part] = line
                starting.remove(s)
                if status != "RUNNING":
                    failed.add(s.part)
                say(f"{s.part:<12} {line}")
        if now >= next_say:
            next_say = now + every_s
        if starting:
            time.sleep(0.5)
    return failed


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
