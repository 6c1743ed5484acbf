"""The background pool's work (`actors.background.background.Background`) with a scripted LLM, and its
wiring into the interaction actor: tool calls, results, errors, timeouts, cancellation,
supersession, ended sessions, contradictions, and what reaches the engine and the client."""

import asyncio
import json
import time

import pytest

from actors.background.background import Background
from actors.interaction.interaction import Interaction
from actors.background.tools import Tool, default_tools
from protocols.requests import TaskRequest
from protocols import BackgroundTask, InputChunk, ProtocolError
from tests.fakes import MockEngine
from tests.sandboxes import limits as sandbox_limits


class ScriptedChat:
    """A `ChatModel` replying with the next scripted JSON object; records what it was asked and
    which requests were cancelled mid-stream. `delay_s` per reply; `hold` never answers."""

    def __init__(self, *replies, delay_s=0.0, hold=False):
        self.replies = list(replies)
        self.delay_s = delay_s
        self.hold = hold
        self.requests = []
        self.cancelled = 0

    async def stream(self, messages, *, response_format, max_tokens):
        self.requests.append({"messages": list(messages), "response_format": response_format})
        try:
            if self.hold:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay_s)
            text = json.dumps(self.replies.pop(0)) if self.replies else '{"answer": "done", "contradicts": false}'
            for i in range(0, len(text), 7):
                yield text[i:i + 7]
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise


def task(sid="sess_a", **kw):
    return BackgroundTask(sid, time.time(), kw.pop("kind", "tool"), kw.pop("instruction", "what time is it?"), context_upto=kw.pop("context_upto", -1), **kw)


async def collect(pool, t):
    return [u async for u in pool.run(t)]


def test_a_tool_call_runs_and_its_result_goes_back_to_the_model():
    chat = ScriptedChat({"tool": "calculator", "arguments": {"expression": "6*7"}}, {"answer": "It is 42.", "contradicts": False})
    pool = Background(chat)
    updates = asyncio.run(collect(pool, task(instruction="six times seven?")))
    assert [u.status for u in updates] == ["progress", "progress", "partial", "final"]
    assert updates[1].data["tool_call"]["name"] == "calculator"
    assert updates[2].data["tool_result"]["output"] == 42 and updates[2].text == "calculator: 42"
    assert updates[3].text == "It is 42." and not updates[3].contradicts
    second = chat.requests[1]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": updates[1].data["tool_call"]["call_id"], "content": "42"}
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calculator"
    assert any(m["role"] == "user" and m["content"] == "six times seven?" for m in second)


def test_a_raising_tool_is_an_error_update():
    tools = default_tools()

    async def broken():
        raise ConnectionError("search backend down")

    tools.register(Tool("search", "raises", {"type": "object", "properties": {}}, broken))
    updates = asyncio.run(collect(Background(ScriptedChat({"tool": "search", "arguments": {}}), tools=tools), task()))
    assert updates[-1].status == "error" and "search backend down" in updates[-1].text, updates[-1]
    assert updates[-1].data["tool_result"]["error"]


def test_the_sandbox_over_its_limits_is_an_error_update():
    tools = default_tools(sandbox_limits(timeout_s=3, cpu_s=1, memory_mb=128))
    for call, match in (
        ({"tool": "python", "arguments": {"code": "x = bytearray(1 << 30)"}}, "memory limit"),
        ({"tool": "python", "arguments": {"code": "while True: pass"}}, "limit"),
    ):
        updates = asyncio.run(collect(Background(ScriptedChat(call), tools=tools), task()))
        assert updates[-1].status == "error" and match in updates[-1].text, updates[-1]
        assert updates[-1].data["tool_result"]["error"]


def test_a_call_to_a_tool_the_task_did_not_offer_is_refused_and_not_run():
    ran = []

    async def search(q=""):
        ran.append(q)
        return ["found"]

    tools = default_tools()  # no sandbox: no python
    tools.register(Tool("search", "searches", {"type": "object", "properties": {"q": {"type": "string"}}}, search))
    offered = {"tools": [{"type": "function", "name": "clock"}, {"type": "function", "name": "python"}]}
    for name in ("search", "python", "nope", 7):
        chat = ScriptedChat({"tool": name, "arguments": {"q": "secrets"}})
        updates = asyncio.run(collect(Background(chat, tools=tools), task(arguments=offered)))
        assert updates[0].data["tools"] == ["clock"] and updates[0].data["unavailable"] == ["python"]
        assert [u.status for u in updates] == ["progress", "error"], updates
        assert "a tool this task does not offer (offered: clock)" in updates[-1].text and updates[-1].data["reason"] == "tool_not_offered"
        assert not any("tool_call" in (u.data or {}) for u in updates)
    assert ran == []
    # Offered, the same call runs.
    updates = asyncio.run(collect(Background(ScriptedChat({"tool": "search", "arguments": {"q": "x"}}), tools=tools), task(arguments={"tools": [{"type": "function", "name": "search"}]})))
    assert ran == ["x"] and updates[-1].status == "final"


def test_a_task_past_its_deadline_ends_with_an_error_update():
    chat = ScriptedChat(hold=True)
    updates = asyncio.run(collect(Background(chat, timeout_s=0.3), task()))
    assert [u.status for u in updates] == ["progress", "error"] and "longer than" in updates[-1].text
    assert chat.cancelled == 1  # the LLM request was cancelled with it


def test_an_unparseable_reply_or_a_failing_llm_is_an_error_update():
    class Cut(ScriptedChat):
        async def stream(self, messages, **kw):
            yield '{"answer": "cut of'

    class Down(ScriptedChat):
        async def stream(self, messages, **kw):
            raise RuntimeError("replica died")
            yield ""

    assert asyncio.run(collect(Background(Cut()), task()))[-1].text.startswith("the model's reply did not parse")
    assert "replica died" in asyncio.run(collect(Background(Down()), task()))[-1].text


def test_cancelling_the_consumer_cancels_the_work_and_the_llm_request():
    chat = ScriptedChat(hold=True)
    pool = Background(chat)

    async def main():
        consumer = asyncio.create_task(collect(pool, task()))
        await asyncio.sleep(0.1)
        assert len(pool.running) == 1
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer
        await asyncio.sleep(0)
        return pool.running

    assert asyncio.run(main()) == {}
    assert chat.cancelled == 1


def test_a_superseding_task_cancels_the_one_it_replaces():
    chat = ScriptedChat(hold=True)
    pool = Background(chat)

    async def main():
        first = task()
        old = asyncio.create_task(collect(pool, first))
        await asyncio.sleep(0.1)
        chat.hold = False
        new = await collect(pool, task(supersedes=first.task_id))
        return await old, new

    old, new = asyncio.run(main())
    assert old[-1].status == "cancelled" and old[-1].text == "superseded"
    assert new[-1].status == "final"


def test_a_task_whose_session_ended_is_dropped_cleanly():
    async def ended(t, log):
        raise ProtocolError("session closed", "session_closed", "session_id")

    chat = ScriptedChat()
    updates = asyncio.run(collect(Background(chat, render=ended), task()))
    assert [u.status for u in updates] == ["progress", "cancelled"] and chat.requests == []


def test_contradiction_is_judged_against_what_the_assistant_said():
    said = [{"role": "user", "content": "is it raining?"}, {"role": "assistant", "content": "No, it is dry."}]

    async def render(t, log):
        return said if t.session_id == "sess_a" else []

    chat = ScriptedChat({"answer": "It is raining.", "contradicts": True}, {"answer": "x", "contradicts": True})
    pool = Background(chat, render=render)
    final = asyncio.run(collect(pool, task()))[-1]
    assert final.contradicts and "No, it is dry." in chat.requests[0]["messages"][0]["content"]
    # With nothing said yet there is nothing to contradict.
    assert not asyncio.run(collect(pool, task("sess_b")))[-1].contradicts


def test_a_task_sees_only_its_own_session():
    logs = {"sess_a": [{"role": "user", "content": "my code is 1234"}], "sess_b": [{"role": "user", "content": "my code is 9876"}]}

    async def render(t, log):
        return logs[t.session_id]

    chat = ScriptedChat()
    pool = Background(chat, render=render)
    asyncio.run(collect(pool, task("sess_b")))
    text = json.dumps(chat.requests[0]["messages"])
    assert "9876" in text and "1234" not in text


def test_response_create_with_tools_reaches_the_pool_and_results_reach_engine_and_client():
    """Typed text + response.create with tools, no delegate control: the task is made, the tool
    runs, its result is pushed into the engine and reported on the session's next outputs, while
    every tick still gives the session its audio."""
    engine = MockEngine(tick_ms=200, trigger="")
    chat = ScriptedChat({"tool": "clock", "arguments": {}}, {"answer": "It is noon.", "contradicts": False}, delay_s=0.05)
    pool = Background(chat)
    clock_tool = {"type": "function", "name": "clock", "description": "time", "parameters": {"type": "object", "properties": {}}}

    # Chunks go into the inbox as exchange puts them; each tick is stepped as the tick loop would.
    async def stepped():
        inter = Interaction(engine, background=pool, t0=time.time() - 10)
        await inter.join("sess_a")
        await inter.join("sess_b")
        tick = inter.core.next_tick
        seen = []
        for k in range(tick, tick + 15):
            a = InputChunk.silent("sess_a", k, inter.clock.start(k), inter.clock.samples())
            b = InputChunk.silent("sess_b", k, inter.clock.start(k), inter.clock.samples())
            if k == tick:
                a = InputChunk("sess_a", k, a.t_start, a.audio, None, "what time is it?",
                               [{"type": "response.create", "response": {"tools": [clock_tool]}}], requests=[TaskRequest(tools=[clock_tool])])
            inter.ticks.inbox[k] = {"sess_a": a, "sess_b": b}
            outs = await inter.step(k)
            assert set(outs) == {"sess_a", "sess_b"} and len(outs["sess_a"].audio) == engine.samples
            assert not outs["sess_b"].events
            seen.append([e["type"] for e in outs["sess_a"].events])
            await asyncio.sleep(0.03)
        return seen

    seen = asyncio.run(stepped())
    flat = [t for s in seen for t in s]
    assert flat[0] == "interplay.background.task"
    assert "response.function_call_arguments.done" in flat and flat.count("interplay.background.update") == 4
    last = max(i for i, s in enumerate(seen) if "interplay.background.update" in s)
    assert last <= 10  # the answer is on the client's stream within 10 ticks of the request
    assert chat.requests[0]["messages"][-1] == {"role": "user", "content": "what time is it?"}
    updates = engine.sessions["sess_a"]["updates"]
    assert updates[0].startswith("clock: ") and updates[-1] == "It is noon."
    assert engine.sessions["sess_b"]["updates"] == []


def test_the_users_speech_reaches_the_model_through_the_speech_option_once_transcribed(tmp_path):
    """Rendered from a real session log: with `speech=Transcripts(transcriber)` the user's speech
    is a user message holding its transcript (made once: a later task reuses it), the typed
    question follows it, the task comes last without its instruction repeated, and `prompt`
    returns what the model was asked with."""
    import numpy as np

    from actors.background.context import Transcripts
    from actors.log.session_log import SessionLog

    class Counting:
        def __init__(self):
            self.calls = 0

        async def transcribe(self, audio):
            self.calls += 1
            return f"heard {audio.size} samples"

    log = SessionLog(str(tmp_path), object_store=False)
    token = log.open("s")
    voice = (3000 * np.sin(np.arange(3200) * 0.07)).astype(np.int16)
    log.append([InputChunk("s", k, k * 0.2, voice if k < 3 else np.zeros(3200, np.int16), text="what time is it?" if k == 6 else "") for k in range(8)])
    transcriber = Counting()
    chat = ScriptedChat()
    pool = Background(chat, log=log, speech=Transcripts(transcriber))
    t = task("s", instruction="what time is it?", context_upto=7, log_token=token)
    asyncio.run(collect(pool, t))
    asyncio.run(collect(pool, task("s", instruction="and now?", context_upto=7, log_token=token)))
    messages = chat.requests[0]["messages"]
    assert messages[1:3] == [{"role": "user", "content": "heard 9600 samples"}, {"role": "user", "content": "what time is it?"}]
    assert messages[-1]["content"].startswith("Your task (tool") and sum("what time is it?" in m["content"] for m in messages) == 2
    assert transcriber.calls == 1  # the second task read the cached transcript
    assert asyncio.run(pool.prompt(t.task_id)) == messages and asyncio.run(pool.prompt("nope")) is None
    # Without a speech option the run is only noted.
    bare = ScriptedChat()
    asyncio.run(collect(Background(bare, log=log), t))
    assert bare.requests[0]["messages"][1]["content"].startswith("[the user spoke for 0.6 s")
