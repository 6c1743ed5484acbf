"""Soak: N concurrent WebRTC calls for M minutes against the full app; does anything drift or grow?

The app is `deployments.app.build` on the embedded default config (the trained tiny model on
CPU), its background pool off so the cores go to the live path; the calls are aiortc peers over
loopback, each speaking a looped phrase and asking for a response every `--respond-every`
seconds. Measured per minute of the run:

- clock drift: each `interplay.tick` event's arrival at the caller less the end of its tick on
  the server's clock (client and server share the machine's clock); the drift is how the median of
  that moves from the first minute (aim: never beyond one tick);
- longest gap in received audio per call: the longest time between two RTP packets arriving
  (aim: none over 40 ms), and packets that never came (RTP timestamp jumps);
- the callers' own event loop lag (the longest late wake-up per minute): the callers share this
  process and the machine with the server, and a gap they see may be their own;
- late and missing chunks: the counters of the interaction actors (totals) and of the ingress
  actors (their gatherers), as increments over the minute;
- resident memory of the Ray worker process of each actor (interaction, ingress, session log),
  sampled every 10 s with psutil; growth is from the first sample after the warm-up minute to the
  mean of the last 30 s (aim: under 5 %). The session log keeps `log.retention_s` (120 s by
  default) of rows in memory by design, so its memory rises for the first two minutes or so of
  any run; `--warmup 180` measures past that.

A progress line every minute; at the end a table, the JSON (bench/results/<name>.json) and a PNG
of memory over time (bench/results/<name>_rss.png; matplotlib if installed, else a plain raster).
Run: `python -m bench.soak` (defaults: 8 calls, 10 minutes); a quick check: `--minutes 1 --calls 4`.

Its parts: the calls (`bench/soak_calls.py`), the measurements (`bench/soak_measure.py`) and the
memory plot (`bench/soak_plot.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, print_table, write_json
from bench.soak_calls import KEY, CallLog, soak_call
from bench.soak_measure import (
    AIMS, KEYS, actor_processes, counters, minute_row, rss_by_role, rss_growth, rss_mb, watch_loop, window,
)
from bench.soak_plot import plot_rss

PORT = 8131
SAMPLE_S = 10.0  # memory sampling period


def start_app(folder: str, port: int):
    """Start a Ray cluster of our own here and the app on its default config (no background
    pool); -> the app's URL, its tick length (ms) and a function that stops both."""
    import ray

    from deployments import app as deployment
    from deployments.config import AppConfig

    print("[soak] starting Ray and the app (default config, background pool off) ...", flush=True)
    ray.init(address="local", namespace=deployment.NAMESPACE, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    config = AppConfig.model_validate({
        "log": {"root": f"{folder}/log"}, "http": {"port": port}, "auth": {"api_keys": [KEY]}, "background": {"enabled": False},
    })
    running = deployment.build(config)
    for name, status in running.parts.items():
        print(f"[soak] {name:<12} {status}", flush=True)

    def stop() -> None:
        try:
            deployment.stop(running)
        finally:
            ray.shutdown()

    return f"http://127.0.0.1:{port}", running.clock.tick_ms, stop


async def soak(url: str, n_calls: int, minutes: float, tick_ms: float, respond_every_s: float, warmup_s: float) -> dict:
    from bench.e2e import speech

    samples16, rate = speech(8.0, tempfile.mkdtemp(prefix="interplay-soak-"))
    from examples.call import resample

    samples = resample(samples16, rate)
    t_start = time.time()
    until = t_start + minutes * 60
    logs = [CallLog(i) for i in range(n_calls)]
    watcher = asyncio.ensure_future(watch_loop())
    calls = [asyncio.ensure_future(soak_call(url, log, samples, until, respond_every_s)) for log in logs]
    roles: dict[int, str] = {}
    samples_rss: list[dict] = []
    minute_counters = [{"t": t_start, **(await counters())}]
    rows: list[dict] = []
    base_ms: list[float] = [float("nan")] * n_calls
    next_sample, minute = t_start, 1
    while True:
        now = time.time()
        if now >= next_sample:
            roles.update(actor_processes())
            samples_rss.append({"t": now, "rss_mb": rss_mb(list(roles))})
            next_sample += SAMPLE_S
        if now >= t_start + minute * 60 or (now >= until and all(c.done() for c in calls)):
            a, b = t_start + (minute - 1) * 60, min(now, t_start + minute * 60)
            minute_counters.append({"t": now, **(await counters())})
            prev, cur = minute_counters[-2], minute_counters[-1]
            delta = {(role, key): cur[role].get(key, 0) - prev[role].get(key, 0) for role, key in KEYS}
            if minute == 1:  # the drift's reference: each call's median offset early on
                base_s = min(60.0, minutes * 60 / 4)
                base_ms = [window(log, t_start, t_start + base_s)["offset_ms"] for log in logs]
            row = minute_row(minute, logs, a, b, base_ms, tick_ms, delta, rss_by_role(samples_rss, a, b + 1, roles))
            rows.append(row)
            rss_text = ", ".join(f"{k[4:-3]} {v:.0f}" for k, v in row.items() if k.startswith("rss "))
            print(
                f"[soak] minute {minute}/{minutes:g}: {row['calls']}/{n_calls} calls live, drift {row['drift ms']:+.1f} ms "
                f"({row['drift ticks']:.2f} ticks), longest gap {row['longest gap ms']:.0f} ms ({row['calls gap>40ms']} calls > 40 ms), "
                f"lost packets {row['lost packets']}, late/missing chunks {row['late (interaction)']}/{row['missing (interaction)']} "
                f"(ingress {row['late (ingress)']}/{row['missing (ingress)']}), RSS MB: {rss_text}",
                flush=True,
            )
            minute += 1
            if now >= until and all(c.done() for c in calls):
                break
        await asyncio.sleep(0.5)
    await asyncio.gather(*calls)
    watcher.cancel()
    end = time.time()
    warm_until = t_start + min(warmup_s, minutes * 60 / 2)
    memory = rss_growth(samples_rss, roles, warm_until, end)
    whole = [window(log, log.started or t_start, end) for log in logs]
    per_call = [{
        "call": log.index, "session": log.session_id, "error": log.error, "ticks": w["ticks"], "packets": w["packets"],
        "longest gap ms": w["gap_ms"], "at s": w["gap_at_s"], "lost packets": w["lost_packets"],
        "max drift ticks": max((abs(r["per_call"][log.index]["offset_ms"] - base_ms[log.index]) / tick_ms for r in rows if r["per_call"][log.index]["ticks"]), default=float("nan")),
    } for log, w in zip(logs, whole)]
    drift_max = max((r["drift ticks"] for r in rows if r["drift ticks"] == r["drift ticks"]), default=float("nan"))
    gap_max = max((c["longest gap ms"] for c in per_call if c["longest gap ms"] == c["longest gap ms"]), default=float("nan"))
    growth_max = max((m["growth %"] for m in memory), default=float("nan"))
    verdict = {
        "drift_within_one_tick": bool(drift_max <= AIMS["drift_ticks"]),
        "no_gap_over_40ms": bool(gap_max <= AIMS["gap_ms"]),
        "rss_growth_under_5pct": bool(growth_max < AIMS["rss_growth_pct"]),
        "calls_without_error": sum(log.error is None for log in logs),
    }
    return {
        "calls": n_calls, "minutes": minutes, "tick_ms": tick_ms, "respond_every_s": respond_every_s, "warmup_s": warm_until - t_start,
        "aims": AIMS, "verdict": verdict, "max_drift_ticks": drift_max, "longest_gap_ms": gap_max, "max_rss_growth_pct": growth_max,
        "minutes_rows": rows, "per_call": per_call, "memory": memory,
        "rss_samples": [{"t": s["t"] - t_start, "rss_mb": {f"{roles.get(pid, '?')} {pid}": mb for pid, mb in s["rss_mb"].items()}} for s in samples_rss],
        "_roles": roles, "_samples": samples_rss, "_t_start": t_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--calls", type=int, default=8, help="concurrent calls (default 8)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    parser.add_argument("--respond-every", type=float, default=20.0, help="seconds between each call's response.create")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before memory growth is measured (at most half the run)")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--name", default="soak", help="results: bench/results/<name>.json and <name>_rss.png")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="interplay-soak-")
    url, tick_ms, stop = start_app(folder, args.port)
    try:
        print(f"[soak] {args.calls} calls for {args.minutes:g} min, a progress line every minute ...", flush=True)
        result = asyncio.run(soak(url, args.calls, args.minutes, float(tick_ms), args.respond_every, args.warmup))
    finally:
        stop()
    roles, samples, t_start = result.pop("_roles"), result.pop("_samples"), result.pop("_t_start")
    os.makedirs(RESULTS, exist_ok=True)
    png = os.path.join(RESULTS, f"{args.name}_rss.png")
    result["rss_plot"] = {"path": os.path.relpath(png, Path(RESULTS).parent.parent), "writer": plot_rss(samples, roles, t_start, png)}
    columns = [c for c in result["minutes_rows"][0] if c != "per_call"] if result["minutes_rows"] else []
    print("\nper minute (drift: the worst call's move of its median tick arrival from its first minute):")
    print_table(result["minutes_rows"], columns)
    print("\nper call:")
    print_table(result["per_call"], ["call", "ticks", "packets", "longest gap ms", "at s", "lost packets", "max drift ticks", "error"])
    print(f"\nresident memory of the actors' processes (growth: after the {result['warmup_s']:.0f} s warm-up to the last 30 s):")
    print_table(result["memory"], ["actor", "start MB", "after warm-up MB", "end MB", "peak MB", "growth %", "samples"])
    v = result["verdict"]
    print(
        f"\naims: drift within one tick: {'yes' if v['drift_within_one_tick'] else 'NO'} (max {result['max_drift_ticks']:.2f} ticks); "
        f"no gap over 40 ms: {'yes' if v['no_gap_over_40ms'] else 'NO'} (longest {result['longest_gap_ms']:.0f} ms); "
        f"RSS growth under 5 %: {'yes' if v['rss_growth_under_5pct'] else 'NO'} (max {result['max_rss_growth_pct']:.1f} %); "
        f"calls without error: {v['calls_without_error']}/{args.calls}"
    )
    path = write_json(args.name, result)
    print(f"\nwritten {path} and {png} ({result['rss_plot']['writer']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
