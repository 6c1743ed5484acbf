"""What the background model is asked, and how its reply is read.

- `default_render(task, log, speech=..., context_s=...)`: the task's conversation from the session
  log (`actors.background.context.render`).
- `first_messages(task, conversation, specs, said)`: the first turn's messages. The system prompt
  gives the worker's role, the offered tools' specs and, when the assistant has said something,
  that last turn quoted so that the model judges whether its answer contradicts it; then the
  conversation; then the task's instruction, unless the conversation already ends with it.
- `step_format(tools, offered, choice, max_tokens)`: one turn's `response_format`, a JSON schema
  holding the reply to one object: a tool call `{"tool": <name>, "arguments": <its schema>}` among
  those `choice` ("auto", "required", "none" or a named function) allows, or the answer
  `{"answer": <text>, "contradicts": <bool>}`, its text capped so that the reply fits `max_tokens`.
- `parse_reply(text, max_tokens)`: the reply as a dict; one that does not parse or is not an
  object raises `LLMError`.
- `tool_messages(call_id, name, arguments, output)`: a tool call and its result as the assistant
  and tool messages handed back to the model.
- `client_tool_names(task, tools)`: the tools a task may use, and those it asked for that the
  registry lacks.
- `without_audio(messages)`: the messages with audio data replaced by its size (what is kept).
"""

from __future__ import annotations

import json
from typing import Any

from protocols import BackgroundTask

from actors.background.chat import LLMError
from actors.background.tools import ToolRegistry

MAX_ANSWER_CHARS = 600
SYSTEM = (
    "You are the background worker of a live spoken conversation. The assistant keeps talking "
    "while you work; what you answer is whispered to it, and it tells the user. Read the "
    "conversation, then reply with exactly one JSON object: "
    '{"tool": <name>, "arguments": {...}} to call one of the tools below, or '
    '{"answer": <short text for the assistant>, "contradicts": <true|false>} when you can answer.'
)


async def default_render(task: BackgroundTask, log_port: Any, speech: Any = None, context_s: float | None = 300.0) -> list[dict]:
    """The conversation from the session log (`actors.background.context.render`: its last `context_s`
    seconds), the user's speech as `speech` makes it (`Transcripts`, `AsAudio`, None); without a
    log, none."""
    if log_port is None:
        return []
    from actors.background.context import render

    return await render(task, log_port, speech=speech, context_s=context_s)


def first_messages(task: BackgroundTask, conversation: list[dict], specs: list[dict], said: str) -> list[dict]:
    """The messages of a task's first turn: the system prompt (tool `specs`, what the assistant
    last `said`), the `conversation`, and the task's instruction last."""
    system = SYSTEM + "\n\nTools:\n" + ("\n".join(json.dumps(s) for s in specs) or "(none)")
    if said:
        system += f"\n\nThe assistant last said: {short(said, 500)!r}. Set contradicts to true if your answer is at odds with that."
    messages = [{"role": "system", "content": system}, *conversation]
    tail = messages[-1]
    if task.instruction.strip() and not (tail.get("role") == "user" and isinstance(tail.get("content"), str) and task.instruction in tail["content"]):
        # a render that does not end with the task (actors.background.context's does): the instruction last
        messages.append({"role": "user", "content": task.instruction})
    return messages


def last_assistant(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "assistant" and isinstance(m.get("content"), str) and m["content"].strip():
            return m["content"].strip()
    return ""


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


def parse_reply(text: str, max_tokens: int) -> dict:
    """One turn's reply as its JSON object; `LLMError` when it is cut off or not an object."""
    try:
        reply = json.loads(text, strict=False)  # control characters inside strings are the model's text
    except ValueError:
        raise LLMError(f"the model's reply did not parse (cut off at {max_tokens} tokens?): {short(text, 120)!r}") from None
    if not isinstance(reply, dict):
        raise LLMError("the model's reply is not a JSON object")
    return reply


def tool_messages(call_id: str, name: str, arguments: Any, output: Any) -> list[dict]:
    """A tool call the model made and its result, as the messages of its next turn."""
    return [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps(output, ensure_ascii=False)},
    ]


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


def without_audio(messages: list[dict]) -> list[dict]:
    """`messages` with each audio part's data replaced by its size."""
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


def short(value: Any, limit: int = 300) -> str:
    """`value` as text (JSON unless a string), cut to `limit` characters with an ellipsis."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
