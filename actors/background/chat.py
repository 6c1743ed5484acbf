"""The background pool's language model as a port: `ChatModel` streams the text of one chat
completion (its content deltas) for a list of OpenAI-style messages under a `response_format`.

`ServeChat(handle)` is that port over a `ray.serve.llm` LLMServer deployment: its `chat` with
`stream=True` yields batches of "data: {chunk}" lines (vLLM's OpenAI serving layer), or chunk
objects; closing the stream early cancels the request. An error the server reports, or a handle
that cannot be found, raises `LLMError`.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Protocol


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
