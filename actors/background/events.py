"""What the client sees of background work: Realtime events for a task and its updates.

`task_events(task)` announces a task (our `interplay.background.task`). `update_events(update)`
reports one `BackgroundUpdate`: a tool call as a `function_call` item (added, arguments delta
and done, item done), a tool's result as a `function_call_output` item, and every update as our
`interplay.background.update` (status, text, data, contradicts, t). The task's id stands for the
response a call belongs to.
"""

from __future__ import annotations

import json

from protocols import BackgroundTask, BackgroundUpdate, new_id
from protocols.realtime_events import event_id, server_event


def task_events(task: BackgroundTask) -> list[dict]:
    """Realtime events announcing a task: our `interplay.background.task`."""
    info = {"id": task.task_id, "kind": task.kind, "instruction": task.instruction, "supersedes": task.supersedes, "tool": task.tool}
    return [{"type": "interplay.background.task", "event_id": event_id(), "task": {k: v for k, v in info.items() if v is not None}}]


def update_events(update: BackgroundUpdate) -> list[dict]:
    """Realtime events for one update: a tool call as a `function_call` item (added, arguments
    delta and done, item done), a tool's result as a `function_call_output` item, and every
    update as our `interplay.background.update` (status, text, data, contradicts)."""
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
