"""What the client sees of background work (`actors.background.events`): a task's announcement,
and each update as Realtime function-call items plus our own update event."""

import json

from actors.background.events import task_events, update_events
from protocols import BackgroundTask, BackgroundUpdate


def update(status, text="", data=None, contradicts=False):
    return BackgroundUpdate("sess_a", 12.5, "task_1", status, text, data, contradicts)


def test_a_task_is_announced_without_its_empty_fields():
    task = BackgroundTask("sess_a", 1.0, "tool", "what time is it?", context_upto=-1)
    [event] = task_events(task)
    assert event["type"] == "interplay.background.task" and event["event_id"].startswith("event_")
    assert event["task"] == {"id": task.task_id, "kind": "tool", "instruction": "what time is it?"}


def test_a_tool_call_is_a_function_call_item_streamed_to_done():
    call = {"call_id": "call_1", "name": "calculator", "arguments": {"expression": "6*7"}}
    events = update_events(update("progress", data={"tool_call": call}))
    assert [e["type"] for e in events] == [
        "conversation.item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "conversation.item.done", "interplay.background.update",
    ]
    added, delta, done, item_done, _ = events
    assert added["item"]["status"] == "in_progress" and added["item"]["arguments"] == ""
    assert delta["delta"] == done["arguments"] == '{"expression": "6*7"}' and done["name"] == "calculator"
    assert delta["response_id"] == "task_1" and delta["item_id"] == delta["call_id"] == "call_1"
    assert item_done["item"]["type"] == "function_call" and item_done["item"]["status"] == "completed"


def test_a_tool_result_is_a_function_call_output_item():
    ok = update_events(update("partial", "clock: noon", {"tool_result": {"call_id": "call_1", "name": "clock", "output": {"utc": "12:00"}}}))
    assert [e["type"] for e in ok] == ["conversation.item.added", "conversation.item.done", "interplay.background.update"]
    assert ok[0]["previous_item_id"] == "call_1" and ok[1]["item"]["type"] == "function_call_output"
    assert json.loads(ok[1]["item"]["output"]) == {"utc": "12:00"}
    failed = update_events(update("error", "down", {"tool_result": {"call_id": "call_2", "name": "search", "error": "down"}}))
    assert json.loads(failed[1]["item"]["output"]) == {"error": "down"}


def test_every_update_is_reported_as_our_event():
    [event] = update_events(update("final", "It is 42.", {"answer": "It is 42."}, contradicts=True))
    assert {k: event[k] for k in ("type", "task_id", "status", "text", "data", "contradicts", "t")} == {
        "type": "interplay.background.update", "task_id": "task_1", "status": "final", "text": "It is 42.",
        "data": {"answer": "It is 42."}, "contradicts": True, "t": 12.5,
    }
