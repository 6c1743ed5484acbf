"""End-to-end overhead of a micro-turn over loopback: N concurrent WebRTC calls (N = 1, 4, 8).

Per micro-turn k: from the moment chunk k's last sample left the client to the moment the first
audio of output k arrived back, minus the step's own compute. Each caller speaks for 2 s, then asks for a response (response.create), and the model speaks
from then on; only micro-turns with output audio are timed. The server tells each client its
clock (t0, tick, jitter margin) in session.created and, per tick, the step time and the sample
of the outgoing stream where that tick's audio plays; the client timestamps every frame it
receives. Client and server share the machine's clock. Run: `python -m bench.e2e`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import tempfile
import time

import numpy as np

from bench.common import percentiles, print_table, write_json
from examples.call import call, read_wav

PORT = 8130
RESPOND_AFTER_S = 2.0  # the caller speaks first, then asks for a response (response.create)
KEY = "sk-bench"


def speech(seconds: float, folder: str) -> tuple[np.ndarray, int]:
    """`seconds` of espeak-ng speech (repeated), or a warbling tone where espeak-ng is missing."""
    if shutil.which("espeak-ng"):
        path = f"{folder}/speech.wav"
        subprocess.run(["espeak-ng", "-w", path, "Hello there. Tell me about the weather tomorrow, and whether I need an umbrella."], check=True)
        samples, rate = read_wav(path)
        samples = np.tile(samples, int(np.ceil(seconds * rate / len(samples))))[: int(seconds * rate)]
        return samples, rate
    t = np.arange(int(seconds * 16000)) / 16000
    return (6000 * np.sin(2 * np.pi * (220 + 60 * np.sin(3 * t)) * t)).astype(np.int16), 16000


def turns(report, skip: int = 5) -> list[dict]:
    """Per-tick figures of one call (the first `skip` ticks warm the pipeline and are left out)."""
    clock = report.clock
    out = []
    for tick in report.ticks[skip:]:
        arrival = report.arrival_of(tick["out_sample"])
        if arrival is None or tick.get("out_level", 0) == 0:
            continue
        tick_end = clock["t0"] + (tick["tick"] + 1) * clock["tick_s"]
        left_client = tick_end - clock.get("jitter_s", 0.0)
        latency = arrival - left_client
        turn = {"latency_ms": latency * 1000, "step_ms": tick["step_ms"], "overhead_ms": latency * 1000 - tick["step_ms"]}
        at = tick.get("at") or {}
        if all(at.get(k) for k in ("gathered", "returned", "written", "plays")):
            turn.update({
                "jitter margin": (tick_end - left_client) * 1000,
                "wait to gather": (at["gathered"] - tick_end) * 1000,
                "exchange less step": (at["returned"] - at["gathered"]) * 1000 - tick["step_ms"],
                "deliver": (at["written"] - at["returned"]) * 1000,
                "playout queue": (at["plays"] - at["written"]) * 1000,
                "send to arrival": (arrival - at["plays"]) * 1000,
            })
        out.append(turn)
    return out


STAGES = ["jitter margin", "wait to gather", "exchange less step", "deliver", "playout queue", "send to arrival"]


async def calls(url: str, n: int, samples: np.ndarray, rate: int) -> list:
    return await asyncio.gather(*(call(url, samples, rate, api_key=KEY, tail_s=1.0, prefetch=0, respond_after_s=RESPOND_AFTER_S) for _ in range(n)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", default="1,4,8", help="concurrent calls per configuration")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each call's input")
    parser.add_argument("--url", default=None, help="a running Interplay (with --api-key); default: start one here")
    parser.add_argument("--api-key", default=KEY)
    parser.add_argument("--jitter-ms", type=float, default=None, help="ingress jitter margin (default: the config's)")
    parser.add_argument("--prebuffer-ms", type=float, default=None, help="playout prebuffer (default: the config's)")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="interplay-bench-")
    url = args.url
    if url is None:
        import ray

        from deployments.app import start, stop
        from deployments.config import AppConfig

        print("[e2e] starting Ray and the app (tiny preset on CPU) ...", flush=True)
        ray.init(namespace="interplay", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        margins = {k: v for k, v in (("jitter_ms", args.jitter_ms), ("prebuffer_ms", args.prebuffer_ms)) if v is not None}
        config = AppConfig.model_validate({"log": {"root": f"{folder}/log"}, "http": {"port": PORT}, "auth": {"api_keys": [args.api_key]}, "ingress": margins})
        jitter_ms, prebuffer_ms = config.margins_ms()
        print(f"[e2e] ingress margins: jitter {jitter_ms:.0f} ms, playout at most {prebuffer_ms:.0f} ms", flush=True)
        for name, status in start(config).items():
            print(f"[e2e] {name:<12} {status}", flush=True)
        url = f"http://127.0.0.1:{PORT}"
    samples, rate = speech(args.seconds, folder)
    rows, stages = [], []
    for n in [int(x) for x in args.calls.split(",")]:
        t = time.monotonic()
        print(f"[e2e] {n} concurrent call(s) of {args.seconds:.0f} s ...", flush=True)
        reports = asyncio.run(calls(url, n, samples, rate))
        per_turn = [turn for report in reports for turn in turns(report)]
        overhead, latency, step = (percentiles(t[k] for t in per_turn) for k in ("overhead_ms", "latency_ms", "step_ms"))
        received = min(len(r.audio) / 48_000 / (len(samples) / rate) for r in reports)
        rows.append({
            "calls": n, "turns": overhead["n"],
            "overhead p50 ms": overhead["p50"], "overhead p99 ms": overhead["p99"],
            "latency p50 ms": latency["p50"], "latency p99 ms": latency["p99"],
            "step p50 ms": step["p50"], "step p99 ms": step["p99"],
            "audio back / in": received, "max gap ms": max(r.max_gap_ms for r in reports),
        })
        timed = [t for t in per_turn if STAGES[0] in t]
        stages.append({"calls": n, **{k: percentiles(t[k] for t in timed)["p50"] for k in STAGES}})
        print(f"[e2e]   done in {time.monotonic() - t:.0f} s: overhead p50 {overhead['p50']:.0f} ms, p99 {overhead['p99']:.0f} ms", flush=True)
    print()
    print_table(rows, list(rows[0]))
    print("\nwhere the overhead goes (p50 ms of each stage; they add up to about the overhead p50):")
    print_table(stages, ["calls", *STAGES])
    name = "e2e" if args.jitter_ms is None and args.prebuffer_ms is None else f"e2e-j{args.jitter_ms}-p{args.prebuffer_ms}"
    path = write_json(name, {"rows": rows, "stages": stages, "seconds": args.seconds, "jitter_ms": args.jitter_ms, "prebuffer_ms": args.prebuffer_ms})
    print(f"\nwritten {path}")
    if args.url is None:
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
