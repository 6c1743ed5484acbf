"""One caller floods, another talks: what the talking caller feels, with and without the flood.

`python -m bench.flood` runs, in one process and in real time, the interaction logic with the
`tiny` engine (random weights), the session log on disk and the background pool's work with its
tools (the python sandbox where it isolates here, else the calculator only); the pool's LLM is
scripted (`FloodChat`), since what is measured is what the flood costs, not what an LLM costs.
Two clients exchange one chunk a tick each, like two ingresses. Phases, each `--seconds` long:

- quiet: both talk; the calm one asks for one background task;
- flood: the flooder also sends `response.create` with tools at every tick, and each task it is
  allowed calls a tool with hostile input (a CPU-burning snippet, a calculator expression built to
  be huge); the calm one again asks for one task.

For the calm caller: its exchange round trip (chunk handed in to output back: the tick's wait,
the batched step, and the queue), the engine's step time, the log appends' latency (every
session's, as the log serves them), the event loop's lag (a 10 ms heartbeat's overshoot), its
chunks stepped as missing, and its task's time from start to final answer. Also the flooder's
tasks started and refused. Prints a table, writes bench/results/flood.json. Leaves out: the
network and the Realtime transport (in process), a real LLM (scripted, instant).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time

import numpy as np

from actors.background.background import Background
from actors.interaction.interaction import EngineSpec, Interaction
from protocols.requests import requests_of
from actors.background.sandbox import SandboxLimits, available
from actors.log.session_log import SessionLog
from actors.background.tools import default_tools
from bench.common import percentiles, print_table, write_json
from protocols import InputChunk
from protocols.seams import AppendResult, Recovery

HOSTILE = ["round(1, -10**3000000)", "9**9**9", "factorial(10**6)", "(10**300)*(10**300)*(10**300)", "2**4000*2**4000"]
TOOLS = [{"type": "function", "name": n} for n in ("calculator", "python")]


class FloodChat:
    """The pool's LLM, scripted: a task whose instruction says "flood" calls a tool with hostile
    input (python with a busy loop, where offered, every other time); any other answers at once."""

    def __init__(self, python: bool):
        self.python = python
        self.asked = 0

    async def stream(self, messages, *, response_format, max_tokens):
        last = messages[-1]
        self.asked += 1
        if last.get("role") == "user" and "flood" in str(last.get("content")):
            if self.python and self.asked % 2:
                reply = {"tool": "python", "arguments": {"code": "while True: pass"}}
            else:
                reply = {"tool": "calculator", "arguments": {"expression": HOSTILE[self.asked % len(HOSTILE)]}}
        else:
            reply = {"answer": "it is sunny", "contradicts": False}
        yield json.dumps(reply)


class TimedLog:
    """The session log in process as the async `Log` port, timing each append."""

    def __init__(self, log: SessionLog):
        self.log, self.append_ms = log, []

    async def open(self, session_id: str) -> str:
        return self.log.open(session_id)

    async def close(self, session_id: str, epoch: int | None = None) -> None:
        self.log.close(session_id, epoch)

    async def append(self, deltas: list, request_id: str | None = None, epochs: dict[str, int] | None = None) -> AppendResult:
        t = time.perf_counter()
        try:
            return self.log.append(deltas, request_id, epochs)
        finally:
            self.append_ms.append((time.perf_counter() - t) * 1000)

    async def put_snapshot(self, session_id: str, tick: int, state: dict, epoch: int | None = None) -> None:
        await self.log.put_snapshot(session_id, tick, state, epoch)

    async def recovery(self, session_id: str, take_over: bool = True) -> Recovery:
        return await self.log.recovery(session_id, take_over)


def sandbox_limits() -> SandboxLimits | None:
    for python in (None, "/usr/bin/python3"):
        if available(python) is None:
            return SandboxLimits(timeout_s=3.0, cpu_s=2, python=python)
    return None


async def client(inter: Interaction, sid: str, ticks: range, flood: bool, ask_at: int, rtt_ms: list, rng) -> None:
    """Hand in this session's chunk of each tick near its end, as an ingress would, and wait for the output."""
    samples = inter.clock.samples()
    for k in ticks:
        await asyncio.sleep(max(0.0, inter.clock.end(k) - 0.02 - inter.now()))
        events, text = [], ""
        if flood:
            events, text = [{"type": "response.create", "response": {"tools": TOOLS}}], "flood the tools"
        elif k == ask_at:
            events, text = [{"type": "response.create", "response": {"tools": TOOLS[:1]}}], "what is the weather?"
        chunk = InputChunk(sid, k, inter.clock.start(k), rng.integers(-3000, 3000, samples, dtype=np.int16), text=text, events=events, requests=requests_of(events))
        t = time.perf_counter()
        await inter.exchange(k, [chunk], [sid])
        if not flood:
            rtt_ms.append((time.perf_counter() - t) * 1000)


async def heartbeat(lag_ms: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        lag_ms.append((time.perf_counter() - t) * 1000 - 10)


async def phase(name: str, seconds: float, tools, python: bool, root: str) -> dict:
    log = TimedLog(SessionLog(f"{root}/{name}", tick_ms=200))
    pool = Background(FloodChat(python), log=log.log, tools=tools, timeout_s=30)
    inter = Interaction(EngineSpec(preset="tiny", checkpoint=None, device="cpu", max_sessions=4), log=log, background=pool, snapshot_s=None)
    inter._start_loop()
    for sid in ("calm", "flood"):
        await inter.join(sid)
    await inter.exchange(inter.current_tick(), [], [])  # let the loop settle on the clock
    first = inter.current_tick() + 2
    ticks = range(first, first + int(seconds * 1000 / inter.clock.tick_ms))
    rtt, lag, stop = [], [], asyncio.Event()
    beat = asyncio.create_task(heartbeat(lag, stop))
    rng = np.random.default_rng(0)
    ask_at = ticks[len(ticks) // 3]
    print(f"  {name}: {len(ticks)} ticks ...", flush=True)
    await asyncio.gather(
        client(inter, "calm", ticks, False, ask_at, rtt, rng),
        client(inter, "flood", ticks, name == "flood", -1, [], rng),
    )
    stop.set()
    await beat
    calm = inter.sessions["calm"]
    task_ms = None
    if calm.log_token is None:
        raise RuntimeError("the calm session joined without a log token")
    rows = log.log.read("calm", calm.log_token)
    kinds, texts, ts = rows.column("kind").to_pylist(), rows.column("text").to_pylist(), rows.column("t").to_pylist()
    started = [t for k, t in zip(kinds, ts) if k == "background_task"]
    finals = [t for k, x, t in zip(kinds, texts, ts) if k == "background_update" and x == "it is sunny"]
    if started and finals:
        task_ms = (finals[0] - started[0]) * 1000
    stats = await inter.stats(last=len(ticks))
    totals = stats.totals
    result = {
        "phase": name, "ticks": len(ticks), "rtt_ms": percentiles(rtt), "step_ms_p50": stats.step_ms_p50, "step_ms_p99": stats.step_ms_p99,
        "append_ms": percentiles(log.append_ms), "loop_lag_ms": percentiles(lag), "missing_chunks": totals["missing_chunks"],
        "calm_task_ms": task_ms, "tasks": totals["tasks"], "tasks_refused": totals["tasks_refused"],
    }
    for sid in ("calm", "flood"):
        await inter.leave(sid)
    return result


async def main_async(seconds: float) -> list[dict]:
    limits = sandbox_limits()
    tools = default_tools(limits)
    print(f"python sandbox: {'on' if limits else 'not available here (calculator only)'}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        return [await phase(name, seconds, tools, limits is not None, root) for name in ("quiet", "flood")]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    args = parser.parse_args()
    logging.getLogger("interplay.context").setLevel(logging.ERROR)  # no speech option here: said once, not per task
    results = asyncio.run(main_async(args.seconds))
    rows = [{
        "phase": r["phase"], "rtt p50": r["rtt_ms"]["p50"], "rtt p99": r["rtt_ms"]["p99"], "step p50": r["step_ms_p50"], "step p99": r["step_ms_p99"],
        "append p50": r["append_ms"]["p50"], "append p99": r["append_ms"]["p99"], "loop lag p99": r["loop_lag_ms"]["p99"],
        "missing": r["missing_chunks"], "calm task ms": r["calm_task_ms"], "tasks": r["tasks"], "refused": r["tasks_refused"],
    } for r in results]
    print_table(rows, list(rows[0]))
    quiet, flood = results
    print(f"flood / quiet: rtt p50 {flood['rtt_ms']['p50'] / quiet['rtt_ms']['p50']:.2f}x, p99 {flood['rtt_ms']['p99'] / quiet['rtt_ms']['p99']:.2f}x; "
          f"append p99 {flood['append_ms']['p99'] / quiet['append_ms']['p99']:.2f}x")
    print("wrote", write_json("flood", {"seconds": args.seconds, "results": results}))


if __name__ == "__main__":
    main()
