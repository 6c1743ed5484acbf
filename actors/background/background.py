"""`Background`: the background pool's work for one task, as the `BackgroundPool` port.

`Background(llm, log=..., tools=...).run(task)` streams `BackgroundUpdate`s:
1. "progress" (started), then the task's recent conversation is rendered from the session log by
   `actors.background.context.render(task, log, speech=..., context_s=...)` (only the task's own session, its
   last `context_s` seconds up to `task.context_upto`; the user's speech as transcripts by
   default, see `speech`), with the task's instruction (typed text, or what the live model said
   it delegates) last (`actors.background.prompt.first_messages`).
2. Up to `max_steps` model turns. Each turn asks the LLM (`actors.background.chat.ChatModel`: the
   Serve LLM deployment through `ServeChat`) for one JSON object under a `response_format` JSON
   schema (`actors.background.prompt.step_format`), so the reply parses unless it is cut off at
   `max_tokens` (then the task ends with an error update): either a tool call
   `{"tool": <name>, "arguments": <that tool's schema>}` or the answer
   `{"answer": <text>, "contradicts": <bool>}`. A tool call is announced ("progress", data
   `tool_call`), run through the `ToolRegistry`, and its result streamed ("partial", data
   `tool_result`) and handed back to the model as a tool message; the answer ends the task
   ("final"). The task's `arguments` may carry the client's `tools` (Realtime function tools:
   only those the registry has are offered) and `tool_choice` ("auto", "required", "none" or a
   named function, applied to the first turn).
3. Contradiction: the system prompt quotes the last thing the assistant said in the conversation
   and the answer schema requires `contradicts`: the model itself judges whether its answer is at
   odds with that. It is honoured only when there is such an assistant turn (else False).

Failures never raise out of `run`: a tool that raises or exceeds its limits, a reply that does
not parse (cut off at `max_tokens`), the LLM failing, or the whole task passing `timeout_s` each
end the stream with one "error" update. A task whose session has ended (the log says so) ends
with a "cancelled" update. Cancelling the consumer cancels the work, the LLM request included; a
task that `supersedes` a running one of the same session cancels that one here too. What the
client sees of these updates is `actors.background.events`.

`BackgroundActor` is the Ray actor of this class; `RemotePool(handle)` is the port over it (its
`run` is a Ray streaming generator; closing the stream cancels the actor's task).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncGenerator, Awaitable, Callable

import ray

from protocols import BackgroundTask, BackgroundUpdate, ProtocolError, new_id

from actors.background.chat import ChatModel, LLMError
from actors.background.prompt import (
    client_tool_names, default_render, first_messages, last_assistant, parse_reply, short, step_format, tool_messages,
    without_audio,
)
from actors.background.tools import ToolError, ToolRegistry, default_tools
from actors.remote import actor_class

log = logging.getLogger("interplay.background")

TERMINAL = ("final", "error", "cancelled")
ENDED_CODES = ("unknown_session", "session_closed", "session_ended", "session_expired")
MAX_UPDATE_TEXT = 2000

Emit = Callable[[BackgroundUpdate], None]


class SessionEnded(Exception):
    pass


class Background:
    """The pool's work (see the module docstring); Ray-free. `llm` a `ChatModel`; `log` the
    session log's handle or port, passed to `render`; `tools` the registry (default: built-ins).

    `speech` is how the user's speech enters the conversation (`actors.background.context`):
    `Transcripts(ServedTranscriber(...))` (the app's default: one per pool driver, so each run
    is transcribed once), `AsAudio()`, or None (only its length). `render(task, log)` replaces the
    whole rendering (default: `default_render` with `speech` and `context_s`). The first prompt of each of the
    last `keep_prompts` tasks is kept for `prompt(task_id)`: what the model was asked with."""

    def __init__(
        self,
        llm: ChatModel,
        *,
        log: Any = None,
        tools: ToolRegistry | None = None,
        speech: Any = None,
        render: Callable[[BackgroundTask, Any], Awaitable[list[dict]]] | None = None,
        timeout_s: float = 60.0,
        max_steps: int = 4,
        max_tokens: int = 256,
        keep_prompts: int = 32,
        context_s: float | None = 300.0,
        now: Callable[[], float] = time.time,
    ):
        self.llm = llm
        self.log = log
        self.tools = tools if tools is not None else default_tools()
        self.speech = speech
        self.render = render if render is not None else functools.partial(default_render, speech=speech, context_s=context_s)
        self.keep_prompts = keep_prompts
        self.prompts: OrderedDict[str, list[dict]] = OrderedDict()
        self.timeout_s = timeout_s
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.now = now
        self.running: dict[str, asyncio.Task] = {}  # task_id -> its work
        self.counts = {"tasks": 0, "final": 0, "error": 0, "cancelled": 0, "tool_calls": 0}

    async def stats(self) -> dict:
        return {"running": len(self.running), **self.counts}

    async def prompt(self, task_id: str) -> list[dict] | None:
        """The messages the model was first asked with for `task_id` (audio data elided), if it
        is one of the last `keep_prompts` tasks; else None."""
        return self.prompts.get(task_id)

    async def run(self, task: BackgroundTask) -> AsyncGenerator[BackgroundUpdate, None]:
        self.counts["tasks"] += 1
        if task.supersedes and task.supersedes in self.running:
            self.running[task.supersedes].cancel()
        queue: asyncio.Queue = asyncio.Queue()
        work = asyncio.get_running_loop().create_task(self._work(task, queue.put_nowait))
        self.running[task.task_id] = work
        work.add_done_callback(lambda _: queue.put_nowait(None))
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    update = await asyncio.wait_for(queue.get(), max(remaining, 0.0))
                except asyncio.TimeoutError:
                    yield self._update(task, "error", f"the task took longer than {self.timeout_s:g} s", {"reason": "timeout"})
                    return
                if update is None:  # the work ended without a last word (cancelled by a newer task)
                    if work.cancelled():
                        yield self._update(task, "cancelled", "superseded", {"reason": "superseded"})
                    return
                yield update
                if update.status in TERMINAL:
                    return
        finally:
            work.cancel()
            self.running.pop(task.task_id, None)

    def _update(self, task: BackgroundTask, status: str, text: str = "", data: Any = None, contradicts: bool = False) -> BackgroundUpdate:
        if status in self.counts:
            self.counts[status] += 1
        return BackgroundUpdate(task.session_id, self.now(), task.task_id, status, text[:MAX_UPDATE_TEXT], data, contradicts)

    async def _work(self, task: BackgroundTask, emit: Emit) -> None:
        try:
            await self._steps(task, emit)
        except asyncio.CancelledError:
            raise
        except SessionEnded:
            emit(self._update(task, "cancelled", "the session ended", {"reason": "session_ended"}))
        except ToolError as exc:
            emit(self._update(task, "error", str(exc), {"reason": "tool"}))
        except LLMError as exc:
            emit(self._update(task, "error", str(exc), {"reason": "llm"}))
        except Exception as exc:  # the LLM or anything else: an error update, never a crash
            log.warning("background task %s failed: %r", task.task_id, exc)
            emit(self._update(task, "error", f"background work failed: {type(exc).__name__}: {short(str(exc), 200)}", {"reason": "failed"}))

    async def _context(self, task: BackgroundTask) -> list[dict]:
        try:
            conversation = await self.render(task, self.log)
        except ProtocolError as exc:
            if exc.code in ENDED_CODES:
                raise SessionEnded(str(exc)) from None
            raise
        return [m for m in conversation if m.get("role") != "system"]

    def _keep(self, task_id: str, messages: list[dict]) -> None:
        if self.keep_prompts:
            self.prompts[task_id] = without_audio(messages)
            while len(self.prompts) > self.keep_prompts:
                self.prompts.popitem(last=False)

    async def _steps(self, task: BackgroundTask, emit: Emit) -> None:
        offered, unavailable = client_tool_names(task, self.tools)
        emit(self._update(task, "progress", "", {"stage": "started", "kind": task.kind, "tools": offered, "unavailable": unavailable}))
        conversation = await self._context(task)
        said = last_assistant(conversation)
        messages = first_messages(task, conversation, self.tools.specs(offered), said)
        self._keep(task.task_id, messages)
        choice = task.arguments.get("tool_choice", "auto")
        llm_ms = 0.0  # time spent waiting on the model so far, reported with each update
        for step in range(self.max_steps):
            last = step == self.max_steps - 1
            fmt = step_format(self.tools, offered, "none" if last else (choice if step == 0 else "auto"), self.max_tokens)
            t = time.perf_counter()
            text = "".join([d async for d in self.llm.stream(messages, response_format=fmt, max_tokens=self.max_tokens)])
            llm_ms += (time.perf_counter() - t) * 1000
            reply = parse_reply(text, self.max_tokens)
            if "tool" in reply:
                if not await self._call(task, emit, reply, offered, messages, llm_ms):
                    return
                continue
            answer = str(reply.get("answer", "")).strip()
            contradicts = bool(reply.get("contradicts")) and bool(said)
            emit(self._update(task, "final", answer or "(no answer)", {"answer": answer, "llm_ms": round(llm_ms, 2)}, contradicts))
            return
        emit(self._update(task, "error", f"no answer after {self.max_steps} model turns", {"reason": "steps"}))

    async def _call(self, task: BackgroundTask, emit: Emit, reply: dict, offered: list[str], messages: list[dict], llm_ms: float) -> bool:
        """Run the tool call `reply` asks for, announcing it and streaming its result, which is
        appended to `messages` for the next turn. False: the task ended here (an error update)."""
        name, arguments = reply["tool"], reply.get("arguments") or {}
        if not isinstance(name, str) or name not in offered:  # a model not held to the schema: never run it
            shown = short(repr(name), 80)
            emit(self._update(task, "error", f"the model called {shown}, a tool this task does not offer (offered: {', '.join(offered) or 'none'})",
                              {"reason": "tool_not_offered", "tool": shown}))
            return False
        call_id = new_id("call")
        self.counts["tool_calls"] += 1
        emit(self._update(task, "progress", "", {"tool_call": {"call_id": call_id, "name": name, "arguments": arguments}, "llm_ms": round(llm_ms, 2)}))
        try:
            output = await self.tools.call(name, arguments)
        except ToolError as exc:
            emit(self._update(task, "error", str(exc), {"tool_result": {"call_id": call_id, "name": name, "error": str(exc)}}))
            return False
        emit(self._update(task, "partial", f"{name}: {short(output)}", {"tool_result": {"call_id": call_id, "name": name, "output": output}, "llm_ms": round(llm_ms, 2)}))
        messages.extend(tool_messages(call_id, name, arguments, output))
        return True


BackgroundActor = actor_class(Background, max_concurrency=1000)


class RemotePool:
    """A `BackgroundActor` handle as the `BackgroundPool` port: `run(task)` iterates the actor's
    streaming generator; closing it early (the consumer cancelled) cancels the actor's task."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def run(self, task: BackgroundTask) -> AsyncGenerator[BackgroundUpdate, None]:
        stream = self.handle.run.options(num_returns="streaming").remote(task)
        finished = False
        try:
            async for ref in stream:
                yield await ref
            finished = True
        finally:
            if not finished:
                ray.cancel(stream)

    def __reduce__(self):
        return RemotePool, (self.handle,)
