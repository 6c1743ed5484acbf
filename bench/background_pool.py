"""Background pool benchmarks (the pool's part of `bench.background`), against the real pool: Ray
Serve LLM with vLLM serving the generated tiny Llama (dummy weights), driven by a
`BackgroundActor` through `RemotePool`, as the app wires it.

- `delegation_overhead`: a client's response.create with a tool (clock, named) goes into the
  interaction actor's tick; from the task being issued (`task.t`, at the step) to its first update
  with text entering the model (the step whose chunk carries it in `InputChunk.updates`), minus
  the time the pool spent waiting on the LLM before it (`llm_ms` in the update): the cost of
  delegation itself (actor hops, the stream, the tool, and the wait for the next tick, up to one
  tick). Aim: p50 under 50 ms plus that wait.
- `pool_throughput`: 1, 4 and 16 tasks at once (each: a forced tool call, then the answer), tasks
  per second and task latency p50/p99, with the pool at one replica.

They are registered in `bench.background` (one entry point for the background benchmarks):
`python -m bench.background --only delegation_overhead pool_throughput`; results go to
bench/results/background.json. This module is the measurements only, and imports nothing of
`bench.background`.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from bench.common import percentiles, print_table

CLOCK = {"type": "function", "name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}
NAMED = {"type": "function", "name": "clock"}


def start_pool(ray, max_tokens: int = 128):
    from actors.background.background import BackgroundActor, RemotePool
    from actors.background.chat import ServeChat
    from deployments.config import BackgroundSection
    from deployments.pool import deploy

    section = BackgroundSection(min_replicas=1, max_replicas=1, max_ongoing_requests=32, max_model_len=2048)
    handle = deploy(section, ray.cluster_resources())
    actor = BackgroundActor.remote(ServeChat(handle, section.model_id), max_tokens=max_tokens, timeout_s=120)
    return RemotePool(actor), actor


class Recorded:
    """A pool that keeps every update it streams."""

    def __init__(self, pool):
        self.pool = pool
        self.seen = []

    async def run(self, task):
        async for update in self.pool.run(task):
            self.seen.append(update)
            yield update


def delegation_overhead(ray, pool, trials: int = 30) -> list[dict]:
    from actors.interaction.interaction import Interaction
    from protocols import InputChunk
    from protocols.ports import Engine
    from protocols.requests import requests_of
    from tests.fakes import MockEngine

    class Timed(MockEngine):
        def __init__(self):
            super().__init__(tick_ms=200, trigger="")
            self.pushed: list[tuple[float, str]] = []

        def step(self, chunks):
            # An update enters the model with its session's next chunk: time that step.
            for chunk in chunks:
                for text in getattr(chunk, "updates", ()) or ():
                    self.pushed.append((time.time(), text))
            return super().step(chunks)

    async def run() -> tuple[list[float], list[float], list[float]]:
        engine = Timed()
        recorded = Recorded(pool)
        # The mock keeps its sessions as a dict by id, which serves where the port's id list is read.
        inter = Interaction(cast(Engine, engine), background=recorded)
        await inter.ready()
        await inter.join("sess_bench")
        overhead, total, llm = [], [], []
        for _ in range(trials):
            before = len(engine.pushed)
            k = inter.core.next_tick  # the next tick stepped: its chunk is on time
            chunk = InputChunk.silent("sess_bench", k, inter.clock.start(k), inter.clock.samples())
            events = [{"type": "response.create", "response": {"tools": [CLOCK], "tool_choice": NAMED}}]
            chunk = InputChunk("sess_bench", k, chunk.t_start, chunk.audio, None, "what time is it?", events, requests=requests_of(events))
            await inter.exchange(k, [chunk], ["sess_bench"])
            task = inter.sessions["sess_bench"].task
            runner = inter.sessions["sess_bench"].runner
            if task is None or runner is None:
                raise RuntimeError("the response.create with a named tool started no background task")
            deadline = time.time() + 120
            while len(engine.pushed) == before and time.time() < deadline:
                await asyncio.sleep(0.001)
            if len(engine.pushed) == before:
                raise RuntimeError(f"no update reached the engine for {task.task_id}")
            pushed_at = engine.pushed[before][0]
            await runner  # let the task finish before the next one
            first = next(u for u in recorded.seen if u.task_id == task.task_id and u.text)
            llm_ms = (first.data or {}).get("llm_ms", 0.0)
            total.append((pushed_at - task.t) * 1000)
            llm.append(llm_ms)
            overhead.append(total[-1] - llm_ms)
        await inter.leave("sess_bench")
        return overhead, total, llm

    overhead, total, llm = asyncio.run(run())
    rows = []
    for name, xs in (("overhead (issued -> input, minus LLM)", overhead), ("issued -> first update in input", total), ("LLM time before it", llm)):
        pc = percentiles(xs)
        rows.append({"measure": name, "p50 ms": pc["p50"], "p99 ms": pc["p99"], "mean ms": pc["mean"], "n": pc["n"]})
    print_table(rows, ["measure", "p50 ms", "p99 ms", "mean ms", "n"])
    return rows


def pool_throughput(ray, pool, concurrency=(1, 4, 16), rounds: int = 2) -> list[dict]:
    from protocols import BackgroundTask

    async def one(i: int) -> tuple[float, str]:
        task = BackgroundTask(f"sess_{i}", time.time(), "tool", "what time is it?", context_upto=-1, arguments={"tools": [CLOCK], "tool_choice": NAMED})
        t = time.perf_counter()
        last = None
        async for update in pool.run(task):
            last = update
        return (time.perf_counter() - t) * 1000, last.status if last else "none"

    async def batch(n: int):
        t = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t, results

    rows = []
    asyncio.run(batch(1))  # warm: grammar compilation of the two schemas
    for n in concurrency:
        latencies, statuses, wall = [], [], 0.0
        for _ in range(rounds):
            seconds, results = asyncio.run(batch(n))
            wall += seconds
            latencies += [r[0] for r in results]
            statuses += [r[1] for r in results]
        pc = percentiles(latencies)
        rows.append({"concurrent": n, "tasks": len(latencies), "tasks/s": len(latencies) / wall, "p50 ms": pc["p50"], "p99 ms": pc["p99"],
                     "final": statuses.count("final"), "error": statuses.count("error")})
    print_table(rows, ["concurrent", "tasks", "tasks/s", "p50 ms", "p99 ms", "final", "error"])
    return rows

