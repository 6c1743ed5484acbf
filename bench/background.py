"""Background work benchmarks: one function per measurement, `main` runs the ones selected.

`python -m bench.background [--only context_read ...]` prints a table per measurement and writes
bench/results/background.json (one key per measurement; the others already there are kept).

- `context_read`: a task's context read from the session log, through object refs
  (`SessionLog.refs` + `fetch`: the sealed segments the log owns in the object store, read
  zero-copy) versus through actor copies (`SessionLog.read`: the actor serialises the rows), for
  1 and 10 minutes of conversation (200 ms ticks: an input chunk of noise and an output chunk
  with text each), from a process beside the log on the same node; and `render` (refs, the
  messages built, transcripts cached). Aim: 10 minutes under 20 ms p99 by reference.
- `delegation_overhead`, `pool_throughput`: against the real pool (Ray Serve LLM with vLLM, the
  generated tiny Llama), see `bench.background_pool`; the pool is started once, on first use,
  for whichever of them run. Aim: overhead p50 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from bench.common import RESULTS, actor, percentiles, print_table, write_json

NAME = "background"
TICK_S = 0.2
SAMPLES = 3_200


# --- context_read -----------------------------------------------------------------------------------


class _CachedText:
    async def transcribe(self, audio):
        return "a transcript"


def _minutes_of_conversation(ray, log, sid: str, minutes: float) -> int:
    """Append `minutes` of ticks (input with noise, output with a word) and return the last index."""
    from protocols import InputChunk, OutputChunk

    rng = np.random.default_rng(0)
    pool = [rng.integers(-3000, 3000, SAMPLES, dtype=np.int16) for _ in range(64)]
    ticks = int(minutes * 60 / TICK_S)
    last = -1
    for k0 in range(0, ticks, 50):
        batch = []
        for k in range(k0, min(k0 + 50, ticks)):
            speaking = (k // 25) % 2 == 0  # 5 s turns
            batch.append(InputChunk(sid, k, k * TICK_S, pool[k % 64] if speaking else pool[k % 64] // 100))
            batch.append(OutputChunk(sid, k, k * TICK_S, pool[(k + 7) % 64], text="" if speaking else "word "))
        last = ray.get(log.append.remote(batch))[sid][1]
    return last


def context_read(ray, minutes=(1.0, 10.0), reads: int = 100, retention_s: float = 900.0) -> list[dict]:
    from actors.background.context import Transcripts, render
    from actors.log.log_actor import SessionLogActor
    from actors.log.log_reads import fetch
    from protocols import BackgroundTask

    root = tempfile.mkdtemp(prefix="bench-background-")
    rows = []
    try:
        log = actor(SessionLogActor.remote(root, tick_ms=200, retention_s=retention_s))
        for m in minutes:
            sid = f"conv-{m:g}min"
            token = ray.get(log.open.remote(sid))
            last = _minutes_of_conversation(ray, log, sid, m)
            end = last + 1
            task = BackgroundTask(sid, 0.0, "delegate", "help", context_upto=last, log_token=token)
            speech = Transcripts(_CachedText())

            async def by_refs():
                return await fetch(await log.refs.remote(sid, token, 0, end), 0, end)

            async def by_copy():
                return await log.read.remote(sid, token, 0, end)

            async def rendered():
                return await render(task, log, speech=speech)

            async def measure(fn):
                got = await fn()  # warm: the first read maps the objects; render fills its cache
                times = []
                for _ in range(reads):
                    t = time.perf_counter()
                    await fn()
                    times.append((time.perf_counter() - t) * 1000)
                return got, times

            for path, fn in (("object refs (zero-copy)", by_refs), ("actor copy (read)", by_copy), ("render, by refs", rendered)):
                got, times = asyncio.run(measure(fn))
                pc = percentiles(times)
                size = got.nbytes if hasattr(got, "nbytes") else len(json.dumps(got))
                rows.append({
                    "conversation": f"{m:g} min", "path": path, "rows": end, "MB": size / 1e6,
                    "p50 ms": pc["p50"], "p99 ms": pc["p99"], "reads": pc["n"],
                    "objects": len([p for p in ray.get(log.refs.remote(sid, token, 0, end)) if isinstance(p[2], ray.ObjectRef)]),
                })
        ray.kill(log, no_restart=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows, ["conversation", "path", "rows", "MB", "objects", "p50 ms", "p99 ms", "reads"])
    return rows


# --- the pool (bench.background_pool) ----------------------------------------------------------------

_pool = None  # the RemotePool the pool measurements share


def _started_pool(ray):
    global _pool
    if _pool is None:
        from bench.background_pool import start_pool

        _pool, _ = start_pool(ray)
    return _pool


def delegation_overhead(ray, trials: int = 30) -> list[dict]:
    from bench.background_pool import delegation_overhead as measure

    return measure(ray, _started_pool(ray), trials)


def pool_throughput(ray) -> list[dict]:
    from bench.background_pool import pool_throughput as measure

    return measure(ray, _started_pool(ray))


# --- main ------------------------------------------------------------------------------------------

MEASUREMENTS = {"context_read": context_read, "delegation_overhead": delegation_overhead, "pool_throughput": pool_throughput}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS))
    parser.add_argument("--reads", type=int, default=100, help="context_read: reads per path and length")
    parser.add_argument("--trials", type=int, default=30, help="delegation_overhead: tasks delegated")
    args = parser.parse_args(argv)
    kwargs = {"context_read": {"reads": args.reads}, "delegation_overhead": {"trials": args.trials}}
    import ray

    global _pool
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    path = os.path.join(RESULTS, f"{NAME}.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    try:
        for name in args.only:
            print(f"\n{name}")
            results[name] = {"rows": MEASUREMENTS[name](ray, **kwargs.get(name, {})), "at": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count()}
    finally:
        if _pool is not None:
            from ray import serve

            serve.shutdown()
            _pool = None
        ray.shutdown()
    print(f"\nwrote {write_json(NAME, results)}")
    return results


if __name__ == "__main__":
    main()
