"""`Background`: the background pool's work for one task, as the `BackgroundPool` port.

`Background(llm, log=..., tools=...).run(task)` streams `BackgroundUpdate`s:
1. "progress" (started), then the task's recent conversation is rendered from the session log by
   `actors.background.context.render(task, log, speech=..., context_s=...)` (only the task's own session, its
   last `context_s` seconds up to `task.context_upto`; the user's speech as transcripts by
   default, see `speech`), with the task's instruction (typed text, or what the live model said
   it delegates) last.
2. Up to `max_steps` model turns. Each turn asks the LLM (`ChatModel`: the Serve LLM deployment
   through `ServeChat`) for one JSON object under a `response_format` JSON schema, so the reply
   parses unless it is cut off at `max_tokens` (then the task ends with an error update): either a tool call `{"tool": <name>, "arguments": <that tool's schema>}` or the
   answer `{"answer": <text>, "contradicts": <bool>}`. A tool call is announced ("progress",
   data `tool_call`), run through the `ToolRegistry`, and its result streamed ("partial", data
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
task that `supersedes` a running one of the same session cancels that one here too.

`BackgroundActor` is the Ray actor of this class; `RemotePool(handle)` is the port over it (its
`run` is a Ray streaming generator; closing the stream cancels the actor's task).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

import ray

from protocols import BackgroundTask, BackgroundUpdate, ProtocolError, new_id

from actors.background.tools import ToolError, ToolRegistry, default_tools
from actors.remote import actor_class

log = logging.getLogger("interplay.background")

TERMINAL = ("final", "error", "cancelled")
ENDED_CODES = ("unknown_session", "session_closed", "session_ended", "session_expired")
MAX_ANSWER_CHARS = 600
MAX_UPDATE_TEXT = 2000
SYSTEM = (
    "You are the background worker of a live spoken conversation. The assistant keeps talking "
    "while you work; what you answer is whispered to it, and it tells the user. Read the "
    "conversation, then reply with exactly one JSON object: "
    '{"tool": <name>, "arguments": {...}} to call one of the tools below, or '
    '{"answer": <short text for the assistant>, "contradicts": <true|false>} when you can answer.'
)


class ChatModel(Protocol):
    """An LLM that streams the text of one chat completion (content deltas)."""

    def stream(self, messages: list[dict], *, response_format: dict, max_tokens: int) -> AsyncIterator[str]: ...


class LLMError(RuntimeError):
    pass


class ServeChat:
    """A `ray.serve.llm` LLMServer deployment handle as a `ChatModel`: `chat` with `stream=True`
    yields batches of "data: {chunk}" lines (vLLM's OpenAI serving layer); closing the stream
    cancels the request."""

    def __init__(self, handle: Any, model_id: str = "background", temperature: float = 0.7, app_name: str | None = None):
        self.handle: Any = handle  # a Serve handle (its streaming `.remote` is untyped); None: `app_name`'s, looked up at first use
        self.model_id = model_id
        self.temperature = temperature
        self.app_name = app_name

    async def stream(self, messages: list[dict], *, response_format: dict, max_tokens: int) -> AsyncIterator[str]:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        request = ChatCompletionRequest(
            model=self.model_id, messages=messages, stream=True, max_tokens=max_tokens,
            temperature=self.temperature, response_format=response_format,
        )
        if self.handle is None:  # deployed from a Serve config: the pool is another application
            from ray import serve

            if self.app_name is None:
                raise LLMError("no pool handle, and no app_name to look one up by")
            self.handle = serve.get_app_handle(self.app_name)
        response = self.handle.options(stream=True).chat.remote(request)
        finished = False
        try:
            async for batch in response:
                for item in batch if isinstance(batch, list) else [batch]:
                    for delta in _deltas(item):
                        yield delta
            finished = True
        finally:
            if not finished:
                response.cancel()


def _deltas(item: Any) -> list[str]:
    """Content deltas in one streamed item: an SSE line "data: {...}", a chunk object, or an error."""
    if isinstance(item, str):
        out = []
        for line in item.splitlines():
            line = line.strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            body = json.loads(line[5:])
            if "error" in body or body.get("object") == "error":
                raise LLMError(str(body.get("error", body).get("message", body) if isinstance(body.get("error"), dict) else body))
            for choice in body.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    out.append(content)
        return out
    dump = item.model_dump() if hasattr(item, "model_dump") else item
    if isinstance(dump, dict):
        if dump.get("object") == "error" or "error" in dump and "choices" not in dump:
            raise LLMError(str(dump.get("message") or dump.get("error")))
        out = []
        for choice in dump.get("choices", []):
            content = (choice.get("delta") or choice.get("message") or {}).get("content")
            if content:
                out.append(content)
        return out
    return []


# --- structured output ---------------------------------------------------------------------------


def answer_schema(max_tokens: int = 4 * MAX_ANSWER_CHARS) -> dict:
    """The answer object. Its text is capped so that it fits in `max_tokens` even at six tokens a
    character (a \\uXXXX escape, one byte a token), so that a reply is never cut off mid-string.
    (A `pattern` forbidding escapes would allow more, but vLLM's xgrammar backend refuses it.)"""
    limit = max(8, min(MAX_ANSWER_CHARS, (max_tokens - 48) // 6))
    text = {"type": "string", "maxLength": limit}
    return {
        "type": "object",
        "properties": {"answer": text, "contradicts": {"type": "boolean"}},
        "required": ["answer", "contradicts"], "additionalProperties": False,
    }


def call_schema(name: str, parameters: dict) -> dict:
    return {
        "type": "object", "properties": {"tool": {"const": name}, "arguments": parameters},
        "required": ["tool", "arguments"], "additionalProperties": False,
    }


def step_format(tools: ToolRegistry, offered: list[str], choice: Any, max_tokens: int = 4 * MAX_ANSWER_CHARS) -> dict:
    """The `response_format` of one turn: the tool calls `choice` allows, and/or the answer."""
    answer_schema_ = answer_schema(max_tokens)
    calls = [call_schema(n, tools.tools[n].parameters) for n in offered]
    if isinstance(choice, dict):  # a named function
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        calls = [call_schema(name, tools.tools[name].parameters)] if name in offered else []
        options = calls or [answer_schema_]
    elif choice == "none" or not calls:
        options = [answer_schema_]
    elif choice == "required":
        options = calls
    else:
        options = calls + [answer_schema_]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {"type": "json_schema", "json_schema": {"name": "background_step", "schema": schema, "strict": True}}


def client_tool_names(task: BackgroundTask, tools: ToolRegistry) -> tuple[list[str], list[str]]:
    """(offered, unavailable): the tools a task may use. The client's list (Realtime function
    tools in `arguments["tools"]`) narrows the registry's; a task naming `tool` gets that one."""
    wanted = task.arguments.get("tools")
    if task.tool:
        names = [task.tool]
    elif isinstance(wanted, list):
        names = [t.get("name") or (t.get("function") or {}).get("name") for t in wanted if isinstance(t, dict)]
        names = [n for n in names if isinstance(n, str)]
    else:
        names = tools.names()
    return [n for n in names if tools.get(n)], [n for n in names if not tools.get(n)]


def last_assistant(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip():
            return m["content"].strip()
    return ""


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def default_render(task: BackgroundTask, log_port: Any, speech: Any = None, context_s: float | None = 300.0) -> list[dict]:
    """The conversation from the session log (`actors.background.context.render`: its last `context_s`
    seconds), the user's speech as `speech` makes it (`Transcripts`, `AsAudio`, None); without a
    log, none."""
    if log_port is None:
        return []
    from actors.background.context import render

    return await render(task, log_port, speech=speech, context_s=context_s)


def _without_audio(messages: list[dict]) -> list[dict]:
    """`messages` with each audio part's data replaced by its size (what `prompt` keeps)."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), list):
            parts = [
                {**p, "input_audio": {**p["input_audio"], "data": f"<{len(p['input_audio']['data'])} base64 chars>"}} if p.get("type") == "input_audio" else p
                for p in m["content"]
            ]
            m = {**m, "content": parts}
        out.append(m)
    return out


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

    async def run(self, task: BackgroundTask) -> AsyncIterator[BackgroundUpdate]:
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

    async def _work(self, task: BackgroundTask, emit: Callable[[BackgroundUpdate], None]) -> None:
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
            emit(self._update(task, "error", f"background work failed: {type(exc).__name__}: {_short(str(exc), 200)}", {"reason": "failed"}))

    async def _context(self, task: BackgroundTask) -> list[dict]:
        try:
            conversation = await self.render(task, self.log)
        except ProtocolError as exc:
            if exc.code in ENDED_CODES:
                raise SessionEnded(str(exc)) from None
            raise
        return [m for m in conversation if m.get("role") != "system"]

    async def _steps(self, task: BackgroundTask, emit: Callable[[BackgroundUpdate], None]) -> None:
        offered, unavailable = client_tool_names(task, self.tools)
        emit(self._update(task, "progress", "", {"stage": "started", "kind": task.kind, "tools": offered, "unavailable": unavailable}))
        conversation = await self._context(task)
        said = last_assistant(conversation)
        system = SYSTEM + "\n\nTools:\n" + ("\n".join(json.dumps(s) for s in self.tools.specs(offered)) or "(none)")
        if said:
            system += f"\n\nThe assistant last said: {_short(said, 500)!r}. Set contradicts to true if your answer is at odds with that."
        messages = [{"role": "system", "content": system}, *conversation]
        tail = messages[-1]
        if task.instruction.strip() and not (tail.get("role") == "user" and isinstance(tail.get("content"), str) and task.instruction in tail["content"]):
            # a render that does not end with the task (actors.background.context's does): the instruction last
            messages.append({"role": "user", "content": task.instruction})
        if self.keep_prompts:
            self.prompts[task.task_id] = _without_audio(messages)
            while len(self.prompts) > self.keep_prompts:
                self.prompts.popitem(last=False)
        choice = task.arguments.get("tool_choice", "auto")
        llm_ms = 0.0  # time spent waiting on the model so far, reported with each update
        for step in range(self.max_steps):
            last = step == self.max_steps - 1
            fmt = step_format(self.tools, offered, "none" if last else (choice if step == 0 else "auto"), self.max_tokens)
            t = time.perf_counter()
            text = "".join([d async for d in self.llm.stream(messages, response_format=fmt, max_tokens=self.max_tokens)])
            llm_ms += (time.perf_counter() - t) * 1000
            try:
                reply = json.loads(text, strict=False)  # control characters inside strings are the model's text
            except ValueError:
                raise LLMError(f"the model's reply did not parse (cut off at {self.max_tokens} tokens?): {_short(text, 120)!r}") from None
            if not isinstance(reply, dict):
                raise LLMError("the model's reply is not a JSON object")
            if "tool" in reply:
                name, arguments = reply["tool"], reply.get("arguments") or {}
                if not isinstance(name, str) or name not in offered:  # a model not held to the schema: never run it
                    shown = _short(repr(name), 80)
                    emit(self._update(task, "error", f"the model called {shown}, a tool this task does not offer (offered: {', '.join(offered) or 'none'})",
                                      {"reason": "tool_not_offered", "tool": shown}))
                    return
                call_id = new_id("call")
                self.counts["tool_calls"] += 1
                emit(self._update(task, "progress", "", {"tool_call": {"call_id": call_id, "name": name, "arguments": arguments}, "llm_ms": round(llm_ms, 2)}))
                try:
                    output = await self.tools.call(name, arguments)
                except ToolError as exc:
                    emit(self._update(task, "error", str(exc), {"tool_result": {"call_id": call_id, "name": name, "error": str(exc)}}))
                    return
                emit(self._update(task, "partial", f"{name}: {_short(output)}", {"tool_result": {"call_id": call_id, "name": name, "output": output}, "llm_ms": round(llm_ms, 2)}))
                messages.append({"role": "assistant", "content": "", "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]})
                messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(output, ensure_ascii=False)})
                continue
            answer = str(reply.get("answer", "")).strip()
            contradicts = bool(reply.get("contradicts")) and bool(said)
            emit(self._update(task, "final", answer or "(no answer)", {"answer": answer, "llm_ms": round(llm_ms, 2)}, contradicts))
            return
        emit(self._update(task, "error", f"no answer after {self.max_steps} model turns", {"reason": "steps"}))


# --- what the client sees ----------------------------------------------------------------------


def task_events(task: BackgroundTask) -> list[dict]:
    """Realtime events announcing a task: our `interplay.background.task`."""
    from protocols.realtime import event_id

    info = {"id": task.task_id, "kind": task.kind, "instruction": task.instruction, "supersedes": task.supersedes, "tool": task.tool}
    return [{"type": "interplay.background.task", "event_id": event_id(), "task": {k: v for k, v in info.items() if v is not None}}]


def update_events(update: BackgroundUpdate) -> list[dict]:
    """Realtime events for one update: a tool call as a `function_call` item (added, arguments
    delta and done, item done), a tool's result as a `function_call_output` item, and every
    update as our `interplay.background.update` (status, text, data, contradicts)."""
    from protocols.realtime import event_id, server_event

    events: list[dict] = []
    data = update.data if isinstance(update.data, dict) else {}
    rid = update.task_id  # the task stands for the response the call belongs to
    if isinstance(data.get("tool_call"), dict):
        call = data["tool_call"]
        args = json.dumps(call.get("arguments", {}), ensure_ascii=False)
        item = {"id": call["call_id"], "object": "realtime.item", "type": "function_call", "call_id": call["call_id"], "name": call["name"], "arguments": ""}
        ids = dict(response_id=rid, item_id=call["call_id"], output_index=0, call_id=call["call_id"])
        events += [
            server_event("conversation.item.added", item={**item, "status": "in_progress"}),
            server_event("response.function_call_arguments.delta", **ids, delta=args),
            server_event("response.function_call_arguments.done", **ids, name=call["name"], arguments=args),
            server_event("conversation.item.done", item={**item, "arguments": args, "status": "completed"}),
        ]
    if isinstance(data.get("tool_result"), dict):
        result = data["tool_result"]
        output = json.dumps({"error": result["error"]} if result.get("error") else result.get("output"), ensure_ascii=False)
        item = {"id": new_id("item"), "object": "realtime.item", "type": "function_call_output", "call_id": result["call_id"], "output": output, "status": "completed"}
        events += [server_event("conversation.item.added", previous_item_id=result["call_id"], item=item), server_event("conversation.item.done", item=item)]
    events.append({
        "type": "interplay.background.update", "event_id": event_id(), "task_id": update.task_id, "status": update.status,
        "text": update.text, "data": update.data, "contradicts": update.contradicts, "t": update.t,
    })
    return events


# --- Ray ---------------------------------------------------------------------------------------

BackgroundActor = actor_class(Background, max_concurrency=1000)


class RemotePool:
    """A `BackgroundActor` handle as the `BackgroundPool` port: `run(task)` iterates the actor's
    streaming generator; closing it early (the consumer cancelled) cancels the actor's task."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def run(self, task: BackgroundTask) -> AsyncIterator[BackgroundUpdate]:
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
