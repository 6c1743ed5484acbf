"""Mouth-to-ear latency of a micro-turn over loopback: N concurrent WebRTC calls (N = 1, 4, 8).

Per micro-turn k: from the moment the packet carrying the last sample of the caller's chunk k
left the caller to the moment the first sample of output k is audible at the caller, after the
caller's own jitter buffer; nothing is subtracted. Which caller samples made up chunk k is the
server's word (`interplay.tick` carries `in.end`, the sender's index just past the last sample
placed in tick k); when each outgoing frame left and when each RTP packet came back, the client
records. Each caller speaks for 2 s, then asks for a response (`response.create`, which the
model must honour), and the model speaks from then on; micro-turns with output audio are timed.

The caller's buffer, two ways, from the same packets:
- `browser model` (the headline): a NetEq-like playout buffer, as a browser plays a call. Packets
  play back to back on a 20 ms clock that starts `target` after the first packet arrived; a
  packet not in by its turn stalls playout until it comes (a gap the caller hears); a buffer
  fuller than `target` + 20 ms plays up to 5 ms faster per packet (time-stretching) until it is
  back at target. `target` = 20 ms (one packet) + the 95th percentile of arrival spread over the
  last 2 s (each packet's lateness relative to the earliest-arriving one).
- `aiortc caller`: where the Python client's receive track (aiortc's default jitter buffer,
  4 packets of prefetch) hands the frame out.
The model is the lean end of what a browser does: headless Chromium on the same loopback (see
bench/e2e_browser.py) reports a jitter-buffer delay of 50-70 ms against a target of about 33 ms.

Stages of the headline, in order (they add up to it exactly): uplink (packet leaves the caller ->
decoded audio reaches the server's chunker), server receive buffer (-> the gatherer takes the
tick: once every call's chunk is complete, or at the tick's deadline; a server that does not
say when, the tick's end), gather (-> the exchange is sent), step (-> outputs are back,
the model's compute and the actor calls), deliver (-> audio written to the playout track),
playout (-> its frame is sent: the track's queue and the response's prebuffer), downlink (-> the
packet reaches the caller), caller buffer (-> audible: the model's buffer, plus where the sample
sits in its 20 ms packet, Opus's 6.5 ms lookahead included). Longest gap: the longest stall in what the
caller plays (browser model), and separately the longest silence the server's playout inserted
into a response because an output came too late (`out_sample` jumps). Client and server share the
machine's clock. The app started here has no background pool (`--background` adds it): no
micro-turn here delegates, and an idle vLLM engine would only take the CPU from the calls. Run:
`python -m bench.e2e`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
import tempfile
import time

import numpy as np

from bench.common import percentiles, print_table, write_json
from examples.call import FRAME, RATE, call, read_wav

PORT = 8130
RESPOND_AFTER_S = 2.0  # the caller speaks first, then asks for a response (response.create)
KEY = "sk-bench"
OPUS_DELAY = 312  # samples at 48 kHz: Opus's lookahead; sample s of a stream decodes at s + 312


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


def browser_playout(packets: list[tuple[float, int]], floor_s: float = 0.020, window_s: float = 2.0, max_stretch_s: float = 0.005) -> tuple[dict[int, float], float]:
    """The browser model (see the module's docstring): {packet index (RTP timestamp - first,
    48 kHz): when it starts to play}, and the longest stall (s)."""
    if not packets:
        return {}, float("nan")
    first = packets[0][1]
    seen: dict[int, float] = {}
    for t, ts in packets:
        seen.setdefault(((ts - first) & 0xFFFFFFFF) // FRAME, t)
    order = sorted(seen)
    offsets = [(seen[j] - j * FRAME / RATE, j) for j in order]  # arrival less stream time
    plays: dict[int, float] = {}
    stall = 0.0
    due = None
    recent: list[tuple[int, float]] = []
    for (offset, j), t in zip(offsets, (seen[j] for j in order)):
        recent.append((j, offset))
        while recent and (j - recent[0][0]) * FRAME / RATE > window_s:
            recent.pop(0)
        lates = np.array([o for _, o in recent])
        target = floor_s + float(np.percentile(lates - lates.min(), 95))
        if due is None:
            due = t + target
        elif t > due:  # not in by its turn: playout waits for it
            stall = max(stall, t - due)
            due = t
        else:
            due -= min(max_stretch_s, max(0.0, (due - t) - target - FRAME / RATE))
        plays[j * FRAME] = due
        due += FRAME / RATE
    return plays, stall


def audible(plays: dict[int, float], sample: int) -> float | None:
    """When output stream sample `sample` is audible: its decoded frame's start plus its offset."""
    at = sample + OPUS_DELAY
    start = plays.get(at // FRAME * FRAME)
    return None if start is None else start + (at % FRAME) / RATE


def arrival(report, sample: int) -> float | None:
    """When the packet carrying output stream sample `sample` arrived at the caller."""
    if not report.packets:
        return None
    first = report.packets[0][1]
    want = (sample + OPUS_DELAY) // FRAME * FRAME
    for t, ts in report.packets:
        if (ts - first) & 0xFFFFFFFF == want:
            return t
    return None


STAGES = ["uplink", "server receive buffer", "gather", "step", "deliver", "playout", "downlink", "caller buffer"]


def turns(report, skip: int = 5) -> tuple[list[dict], dict]:
    """Per-tick figures of one call (the first `skip` ticks warm the pipeline and are left out),
    and the call's gaps."""
    clock = report.clock
    tick_s = clock["tick_s"]
    plays, stall = browser_playout(report.packets)
    handed = {pts: t for t, pts in report.frames}
    out, out_gap, approx = [], 0.0, 0
    ticks = sorted(report.ticks, key=lambda e: e["tick"])
    per_tick = round(tick_s * RATE)
    for prev, tick in zip(ticks, ticks[1:]):
        if prev.get("out_level", 0) > 0 and tick.get("out_level", 0) > 0 and tick["tick"] == prev["tick"] + 1:
            out_gap = max(out_gap, (tick["out_sample"] - prev["out_sample"] - per_tick) / RATE)
    for tick in ticks[skip:]:
        if tick.get("out_level", 0) == 0:
            continue
        sample = tick["out_sample"]
        heard = audible(plays, sample)
        if heard is None:
            continue
        tick_end = clock["t0"] + (tick["tick"] + 1) * tick_s
        src = tick.get("in") or {}
        frame = None if src.get("end") is None else (src["end"] - 1) // FRAME
        if frame is not None and 0 <= frame < len(report.sent_at):
            left = report.sent_at[frame]
        else:  # the server did not say which samples made up the chunk: its margin's nominal place
            left = tick_end - clock.get("jitter_s", 0.0)
            approx += 1
        turn = {"mouth_to_ear_ms": (heard - left) * 1000, "step_ms": tick["step_ms"], "margin_ms": src.get("margin_ms")}
        aiortc_out = handed.get((sample + OPUS_DELAY) // FRAME * FRAME)
        if aiortc_out is not None:
            turn["aiortc_ms"] = (aiortc_out + ((sample + OPUS_DELAY) % FRAME) / RATE - left) * 1000
        at = tick.get("at") or {}
        back = arrival(report, sample)
        if src.get("arrived") and back and all(at.get(k) for k in ("gathered", "returned", "written", "plays")):
            marks = [left, src["arrived"], at.get("ready", tick_end), at["gathered"], at["returned"], at["written"], at["plays"], back, heard]
            turn.update({name: (b - a) * 1000 for name, a, b in zip(STAGES, marks, marks[1:])})
        out.append(turn)
    return out, {"stall_ms": stall * 1000, "out_gap_ms": out_gap * 1000, "approx": approx}


async def calls(url: str, n: int, samples: np.ndarray, rate: int) -> list:
    return await asyncio.gather(*(call(url, samples, rate, api_key=KEY, tail_s=1.0, respond_after_s=RESPOND_AFTER_S) for _ in range(n)))


def start_app(args, folder: str):
    """Start Ray and the app here (tiny preset on CPU); its URL and a function that stops it."""
    import ray

    from deployments import app as deployment
    from deployments.config import AppConfig

    print("[e2e] starting Ray and the app (tiny preset on CPU) ...", flush=True)
    ray.init(namespace="interplay", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    margins = {k: v for k, v in (("jitter_ms", args.jitter_ms), ("prebuffer_ms", args.prebuffer_ms)) if v is not None}
    config = AppConfig.model_validate({
        "log": {"root": f"{folder}/log"}, "http": {"port": PORT}, "auth": {"api_keys": [args.api_key]}, "ingress": margins,
        **({} if args.background else {"background": {"enabled": False}}),
    })
    running = deployment.build(config)
    for name, status in running.parts.items():
        print(f"[e2e] {name:<12} {status}", flush=True)

    def stop_all() -> None:
        deployment.stop(running)
        ray.shutdown()

    return f"http://127.0.0.1:{PORT}", stop_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--calls", default="1,4,8", help="concurrent calls per configuration")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each call's input")
    parser.add_argument("--url", default=None, help="a running Interplay (with --api-key); default: start one here")
    parser.add_argument("--api-key", default=KEY)
    parser.add_argument("--jitter-ms", type=float, default=None, help="cap of the ingress's adaptive margin (default: the config's)")
    parser.add_argument("--prebuffer-ms", type=float, default=None, help="playout prebuffer cap (default: the config's)")
    parser.add_argument("--background", action="store_true", help="start the app with its background pool (vLLM) too")
    parser.add_argument("--name", default="e2e", help="results file: bench/results/<name>.json")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="interplay-bench-")
    url, stop = (args.url, None) if args.url else start_app(args, folder)
    samples, rate = speech(args.seconds, folder)
    rows, stages, raw = [], [], {}
    try:
        for n in [int(x) for x in args.calls.split(",")]:
            t = time.monotonic()
            print(f"[e2e] {n} concurrent call(s) of {args.seconds:.0f} s ...", flush=True)
            reports = asyncio.run(calls(url, n, samples, rate))
            per_call = [turns(report) for report in reports]
            per_turn = [turn for turns_, _ in per_call for turn in turns_]
            m2e, aio, step = (percentiles(t[k] for t in per_turn if k in t) for k in ("mouth_to_ear_ms", "aiortc_ms", "step_ms"))
            received = min(len(r.audio) / RATE / (len(samples) / rate) for r in reports)
            rows.append({
                "calls": n, "turns": m2e["n"],
                "mouth-to-ear p50": m2e["p50"], "p99": m2e["p99"],
                "longest stall ms": max(g["stall_ms"] for _, g in per_call),
                "longest out gap ms": max(g["out_gap_ms"] for _, g in per_call),
                "aiortc caller p50": aio["p50"], "aiortc p99": aio["p99"],
                "step p50": step["p50"], "step p99": step["p99"],
                "margin p50": percentiles(t["margin_ms"] for t in per_turn if t.get("margin_ms") is not None)["p50"],
                "audio back / in": received,
            })
            approx = sum(g["approx"] for _, g in per_call)
            timed = [t for t in per_turn if STAGES[0] in t]
            stages.append({"calls": n, **{k: percentiles(t[k] for t in timed)["p50"] for k in STAGES}, "sum": sum(percentiles(t[k] for t in timed)["p50"] for k in STAGES)})
            raw[str(n)] = per_turn
            note = f" ({approx} turns timed from the nominal margin: no `in` in interplay.tick)" if approx else ""
            print(f"[e2e]   done in {time.monotonic() - t:.0f} s: mouth-to-ear p50 {m2e['p50']:.0f} ms, p99 {m2e['p99']:.0f} ms{note}", flush=True)
    finally:
        if stop is not None:
            stop()
    print("\nmouth-to-ear, ms (browser model of the caller's buffer; aiortc caller: the Python client's own):")
    print_table(rows, list(rows[0]))
    print("\nwhere it goes (p50 ms of each stage, in order; the p50s need not add up to the p50):")
    print_table(stages, ["calls", *STAGES, "sum"])
    path = write_json(args.name, {"rows": rows, "stages": stages, "turns": raw, "seconds": args.seconds, "jitter_ms": args.jitter_ms, "prebuffer_ms": args.prebuffer_ms})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
