"""What the background model is asked (`actors.background.prompt`): the first turn's messages,
each turn's JSON-schema `response_format`, and how a reply is read."""

import time

import pytest

from actors.background.chat import LLMError
from actors.background.prompt import (
    answer_schema, client_tool_names, first_messages, last_assistant, parse_reply, step_format, tool_messages, without_audio,
)
from actors.background.tools import default_tools
from protocols import BackgroundTask


def task(instruction="what time is it?", **kw):
    return BackgroundTask("sess_a", time.time(), "tool", instruction, context_upto=-1, **kw)


def test_tool_calls_are_constrained_by_json_schema():
    tools = default_tools()
    fmt = step_format(tools, ["clock", "calculator"], "auto")
    options = fmt["json_schema"]["schema"]["anyOf"]
    assert [o["properties"].get("tool", {}).get("const") for o in options] == ["clock", "calculator", None]
    assert options[1]["properties"]["arguments"] == tools.get("calculator").parameters
    named = step_format(tools, ["clock", "calculator"], {"type": "function", "name": "clock"})["json_schema"]["schema"]
    assert named["properties"]["tool"] == {"const": "clock"}
    assert "answer" in step_format(tools, ["clock"], "none")["json_schema"]["schema"]["properties"]
    required = step_format(tools, ["clock", "calculator"], "required")["json_schema"]["schema"]["anyOf"]
    assert all("tool" in o["properties"] for o in required)
    # A named function the task does not offer, or no tools at all: only the answer.
    assert "answer" in step_format(tools, ["clock"], {"type": "function", "name": "calculator"})["json_schema"]["schema"]["properties"]
    assert "answer" in step_format(tools, [], "required")["json_schema"]["schema"]["properties"]


def test_the_answer_fits_its_token_budget():
    assert answer_schema(256)["properties"]["answer"]["maxLength"] == (256 - 48) // 6
    assert answer_schema(100_000)["properties"]["answer"]["maxLength"] == 600
    assert answer_schema(10)["properties"]["answer"]["maxLength"] == 8


def test_the_first_turn_quotes_what_the_assistant_said_and_ends_with_the_task():
    conversation = [{"role": "user", "content": "is it raining?"}, {"role": "assistant", "content": " No, it is dry. "}]
    said = last_assistant(conversation)
    assert said == "No, it is dry."
    messages = first_messages(task(), conversation, default_tools().specs(["clock"]), said)
    system = messages[0]["content"]
    assert messages[0]["role"] == "system" and '"clock"' in system and "'No, it is dry.'" in system
    assert messages[1:3] == conversation and messages[-1] == {"role": "user", "content": "what time is it?"}
    # A rendering that already ends with the task, or an empty instruction: nothing appended.
    rendered = [{"role": "user", "content": "Your task (tool): what time is it?"}]
    assert first_messages(task(), rendered, [], "")[1:] == rendered
    assert first_messages(task(""), conversation, [], "")[1:] == conversation
    bare = first_messages(task(), [], [], "")[0]["content"]
    assert bare.endswith("Tools:\n(none)") and "assistant last said" not in bare


def test_a_reply_is_one_json_object():
    assert parse_reply('{"answer": "line\none", "contradicts": false}', 256) == {"answer": "line\none", "contradicts": False}
    with pytest.raises(LLMError, match="did not parse"):
        parse_reply('{"answer": "cut of', 256)
    with pytest.raises(LLMError, match="not a JSON object"):
        parse_reply("[1]", 256)


def test_a_tool_call_and_its_result_go_back_as_assistant_and_tool_messages():
    call, result = tool_messages("call_1", "calculator", {"expression": "6*7"}, 42)
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "6*7"}'}
    assert result == {"role": "tool", "tool_call_id": "call_1", "content": "42"}


def test_the_clients_tools_narrow_the_registrys():
    tools = default_tools()
    wanted = {"tools": [{"type": "function", "name": "clock"}, {"function": {"name": "nope"}}, "junk"]}
    assert client_tool_names(task(arguments=wanted), tools) == (["clock"], ["nope"])
    assert client_tool_names(task(tool="calculator", arguments=wanted), tools) == (["calculator"], [])
    assert client_tool_names(task(), tools) == (tools.names(), [])


def test_kept_prompts_hold_the_audio_size_not_the_audio():
    audio = {"type": "input_audio", "input_audio": {"data": "QUJD" * 10, "format": "wav"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": "hi"}]}, {"role": "user", "content": "typed"}]
    kept = without_audio(messages)
    assert kept[0]["content"][0]["input_audio"] == {"data": "<40 base64 chars>", "format": "wav"}
    assert kept[0]["content"][1:] == messages[0]["content"][1:] and kept[1] == messages[1]
