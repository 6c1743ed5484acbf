"""MoshiEngine benchmark: tick latency against sessions and tick length, and per-tick cost far
past the LM's context. Run through `python -m bench.engine --moshi DIR` (a checkpoint directory,
e.g. from `python -m models.moshi.random_checkpoint DIR`); writes bench/results/engine_moshi.json.

- For each tick length (`--frames`: 80 ms Mimi frames per tick) and session count, an engine with
  that many rows, every row live, stepped `--ticks` times after a warm-up: p50/p99 of `step`.
- Past context: one engine at the largest session count stepped through 3x the LM's context;
  per-tick time over ticks 5..15 against the last ten ticks.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import percentiles, print_table, write_json
from models.moshi.checkpoint import load
from models.moshi.engine import MoshiEngine, _share
from protocols.chunks import InputChunk


def chunks(sids: list[str], k: int, samples: int) -> list[InputChunk]:
    out = []
    for j, sid in enumerate(sids):
        rng = np.random.default_rng([j, k])
        t = (np.arange(samples) + k * samples) / 16_000
        x = 0.3 * np.sin(2 * np.pi * (140 + 20 * j) * t) + 0.05 * rng.standard_normal(samples)
        out.append(InputChunk(sid, k, 0.0, (x * 32767).astype(np.int16)))
    return out


def step_times(engine: MoshiEngine, ticks: int, k0: int = 0) -> list[float]:
    sids = engine.sessions
    times = []
    for k in range(k0, k0 + ticks):
        c = chunks(sids, k, engine.samples_per_tick)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step(c)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    return times


def engine_with(models, n: int, frames: int) -> MoshiEngine:
    eng = MoshiEngine(_share(models), max_sessions=n, frames_per_tick=frames, _spare=False)
    for i in range(n):
        eng.add_session(f"s{i}")
    return eng


def run(path: str, device: str, dtype, sessions: list[int], frames: list[int], ticks: int, warmup: int, out: str) -> dict:
    models = load(path, device, dtype)
    rows = []
    for f in frames:
        for n in sessions:
            eng = engine_with(models, n, f)
            step_times(eng, warmup)
            p = percentiles(step_times(eng, ticks, warmup))
            rows.append({"tick_ms": eng.tick_ms, "sessions": n, "p50_ms": p["p50"], "p99_ms": p["p99"],
                         "p99_share_of_tick": p["p99"] / eng.tick_ms})
            del eng
    print_table(rows, ["tick_ms", "sessions", "p50_ms", "p99_ms", "p99_share_of_tick"])
    context = models.lm.transformer.layers[0].self_attn.context
    n = max(sessions)
    eng = engine_with(models, n, frames[0])
    total = 3 * context // frames[0] + 10
    times = step_times(eng, total)
    early, late = percentiles(times[5:15]), percentiles(times[-10:])
    ctx = [{"lm_context_frames": context, "sessions": n, "ticks": total, "tick_5_15_p50_ms": early["p50"],
            "last_10_p50_ms": late["p50"], "ratio": late["p50"] / early["p50"]}]
    print_table(ctx, list(ctx[0]))
    result = {"checkpoint": str(path), "device": device, "threads": torch.get_num_threads(), "latency": rows, "past_context": ctx}
    print(write_json(out, result))
    return result
