"""The pool's LLM port over a Serve handle (`actors.background.chat.ServeChat`): the content
deltas of streamed SSE lines or chunk objects, a reported error as `LLMError`, and the request
cancelled when the consumer stops early. The handle here is a stand-in for a Serve handle."""

import asyncio
import json

import pytest

from actors.background.chat import LLMError, ServeChat

FORMAT = {"type": "json_object"}


def sse(*contents):
    return "\n".join("data: " + json.dumps({"choices": [{"delta": {"content": c}}]}) for c in contents) + "\ndata: [DONE]\n"


class Chunk:
    def __init__(self, content):
        self.content = content

    def model_dump(self):
        return {"object": "chat.completion.chunk", "choices": [{"delta": {"content": self.content}}]}


class Response:
    def __init__(self, batches):
        self.batches = batches
        self.cancelled = False

    async def __aiter__(self):
        for batch in self.batches:
            yield batch

    def cancel(self):
        self.cancelled = True


class Handle:
    """`handle.options(stream=True).chat.remote(request)` answering the given batches."""

    def __init__(self, *batches):
        self.response = Response(batches)
        self.requests = []

    def options(self, stream):
        assert stream
        return self

    @property
    def chat(self):
        return self

    def remote(self, request):
        self.requests.append(request)
        return self.response


def text(chat):
    async def main():
        return [d async for d in chat.stream([{"role": "user", "content": "hi"}], response_format=FORMAT, max_tokens=32)]

    return asyncio.run(main())


def test_deltas_of_sse_lines_and_chunk_objects_in_batches():
    handle = Handle([sse('{"ans', 'wer"'), sse("")], Chunk(": 1}"), {"choices": [{"message": {"content": "!"}}]}, 7)
    assert text(ServeChat(handle, "mine", temperature=0.2)) == ['{"ans', 'wer"', ": 1}", "!"]
    request = handle.requests[0]
    assert (request.model, request.stream, request.max_tokens, request.temperature) == ("mine", True, 32, 0.2)
    assert not handle.response.cancelled


def test_an_error_the_server_reports_is_an_llm_error():
    for batch in ("data: " + json.dumps({"error": {"message": "too long"}}), {"object": "error", "message": "too long"}):
        handle = Handle(sse("x"), batch)
        with pytest.raises(LLMError, match="too long"):
            text(ServeChat(handle))
        assert handle.response.cancelled


def test_stopping_early_cancels_the_request():
    handle = Handle(sse("a"), sse("b"))

    async def first():
        stream = ServeChat(handle).stream([], response_format=FORMAT, max_tokens=8)
        delta = await stream.__anext__()
        await stream.aclose()
        return delta

    assert asyncio.run(first()) == "a" and handle.response.cancelled


def test_without_a_handle_or_an_app_name_it_says_so():
    with pytest.raises(LLMError, match="no app_name"):
        text(ServeChat(None))
