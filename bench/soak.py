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
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import RESULTS, print_table, write_json

PORT = 8131
KEY = "sk-soak"
RATE, FRAME = 48_000, 960  # the call's audio: 20 ms frames at 48 kHz
SAMPLE_S = 10.0  # memory sampling period
AIMS = {"drift_ticks": 1.0, "gap_ms": 40.0, "rss_growth_pct": 5.0}
ROLES = {"Interaction": "interaction", "Ingress": "ingress", "SessionLog": "session_log"}  # Ray process title -> role
_TITLE = re.compile(r"^ray::(" + "|".join(ROLES) + r")\b")


# --- the calls ---------------------------------------------------------------------------------


@dataclass
class CallLog:
    """What one call saw: raw enough to cut into minutes at the end, small enough for an hour."""

    index: int
    session_id: str | None = None
    clock: dict = field(default_factory=dict)
    ticks: list[tuple[int, float]] = field(default_factory=list)  # (tick, arrival time) of interplay.tick events
    packets: list[tuple[float, int]] = field(default_factory=list)  # (arrival time, RTP timestamp)
    started: float | None = None
    ended: float | None = None
    error: str | None = None


def looped_track(samples: np.ndarray):
    """An aiortc audio track playing `samples` (48 kHz mono int16) in a loop, in real time."""
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class LoopTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sent = 0
            self.start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.start is None:
                self.start = time.time()
            wait = self.start + self.sent / RATE - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            at = self.sent % len(samples)
            chunk = np.take(samples, np.arange(at, at + FRAME), mode="wrap")
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent, fractions.Fraction(1, RATE)
            self.sent += FRAME
            return frame

    return LoopTrack()


async def soak_call(url: str, log: CallLog, samples: np.ndarray, until: float, respond_every_s: float) -> None:
    """One call from now until `until` (wall clock); fills `log`, never raises."""
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    from actors.ingress.ice import use_ice_addresses
    from examples.call import _time_packets, post_offer

    use_ice_addresses(["127.0.0.1"])  # a local server: the media stays on loopback too
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(looped_track(samples))
    channel = pc.createDataChannel("oai-events")
    opened = asyncio.Event()
    sinks: list[asyncio.Task] = []

    @channel.on("open")
    def _open():
        opened.set()

    @channel.on("message")
    def _message(raw):
        event = json.loads(raw)
        kind = event.get("type")
        if kind == "interplay.tick":
            log.ticks.append((int(event["tick"]), time.time()))
        elif kind == "session.created":
            log.clock = event.get("session", {}).get("interplay", {}).get("clock", {})
            channel.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "interplay": {"tick_events": True}}}))
        elif kind == "error" and log.error is None:
            log.error = str(event.get("error", {}).get("code") or event.get("error"))

    async def drain(remote):  # decode and drop what comes back: only the packet times are kept
        while True:
            try:
                await remote.recv()
            except MediaStreamError:
                return

    @pc.on("track")
    def _track(remote):
        for receiver in pc.getReceivers():
            if receiver.track is remote and remote.kind == "audio":
                _time_packets(receiver, log.packets)
        sinks.append(asyncio.ensure_future(drain(remote)))

    try:
        await pc.setLocalDescription(await pc.createOffer())
        status, body, location = await asyncio.to_thread(post_offer, url, pc.localDescription.sdp, KEY)
        if status != 201:
            raise RuntimeError(f"call refused: HTTP {status}: {body[:200]}")
        log.session_id = (location or "").rsplit("/", 1)[-1] or None
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        await asyncio.wait_for(opened.wait(), 30)
        log.started = time.time()
        next_response = log.started + min(2.0, respond_every_s)
        while time.time() < until and pc.connectionState not in ("failed", "closed"):
            if time.time() >= next_response:
                channel.send(json.dumps({"type": "response.create"}))
                next_response += respond_every_s
            await asyncio.sleep(0.1)
        if pc.connectionState in ("failed", "closed"):
            log.error = log.error or f"connection {pc.connectionState}"
    except Exception as exc:  # one call failing is a figure, not the end of the soak
        log.error = f"{type(exc).__name__}: {exc}"
    finally:
        log.ended = time.time()
        await pc.close()
        for task in sinks:
            task.cancel()


# --- the server side ---------------------------------------------------------------------------


def actor_processes() -> dict[int, str]:
    """{pid: role} of the Ray worker processes of the app's actors: this process's descendants
    (the cluster was started here) whose title is `ray::<Class>`."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            m = _TITLE.match(" ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if m:
            found[proc.pid] = ROLES[m[1]]
    return found


def rss_mb(pids: list[int]) -> dict[int, float | None]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            out[pid] = None
    return out


async def counters() -> dict:
    """Late / missing chunk counters summed over the interaction actors (totals) and the ingress
    actors (their gatherers), found by name so that actors made after the build count too."""
    import ray

    from deployments.app import NAMESPACE
    from deployments.spec import named_actors

    names = [a["name"] for a in named_actors() if a.get("namespace") == NAMESPACE]
    out = {"interaction": {}, "ingress": {}}
    calls = []
    for name in names:
        role = "interaction" if re.fullmatch(r"interaction(-\d+)?", name) else "ingress" if re.fullmatch(r"ingress(-\d+)?", name) else None
        if role:
            calls.append((role, ray.get_actor(name, namespace=NAMESPACE).stats.remote()))
    for role, ref in calls:
        try:
            stats: dict = await asyncio.wait_for(asyncio.wrap_future(ref.future()), 10)
        except Exception:
            continue
        figures = stats.get("totals", stats) if role == "interaction" else stats
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[role][key] = out[role].get(key, 0) + value
    return out


KEYS = {  # counters reported per minute: (role, key) -> column
    ("interaction", "late_chunks"): "late (interaction)",
    ("interaction", "missing_chunks"): "missing (interaction)",
    ("ingress", "late_chunks"): "late (ingress)",
    ("ingress", "missing_chunks"): "missing (ingress)",
    ("ingress", "skipped_ticks"): "skipped ticks",
    ("ingress", "late_exchanges"): "late exchanges",
}


LOOP_LAG: list[tuple[float, float]] = []  # (time, ms) the callers' event loop woke late: it times the packets


async def watch_loop(period_s: float = 0.01) -> None:
    """Record how late this process's event loop wakes: a gap seen by a late loop is the client's."""
    loop = asyncio.get_running_loop()
    while True:
        t = loop.time()
        await asyncio.sleep(period_s)
        late_ms = (loop.time() - t - period_s) * 1000
        if late_ms > 5:
            LOOP_LAG.append((time.time(), late_ms))


# --- figures -----------------------------------------------------------------------------------


def tick_offsets(log: CallLog) -> np.ndarray:
    """(arrival time, arrival less the end of its tick on the server's clock) per tick event."""
    if not log.ticks or "t0" not in log.clock:
        return np.zeros((0, 2))
    t0, tick_s = float(log.clock["t0"]), float(log.clock["tick_s"])
    return np.array([(at, at - (t0 + (k + 1) * tick_s)) for k, at in log.ticks])


def window(log: CallLog, a: float, b: float) -> dict:
    """One call's figures over wall-clock [a, b)."""
    packets = [(t, ts) for t, ts in log.packets if a <= t < b]
    times = np.array([t for t, _ in packets])
    gaps = np.diff(times)
    gap = float(gaps.max() * 1000) if len(gaps) else float("nan")
    gap_at = float(times[int(gaps.argmax())] - (log.started or times[0])) if len(gaps) else float("nan")
    lost = 0
    for (_, x), (_, y) in zip(packets, packets[1:]):
        step = (y - x) & 0xFFFFFFFF
        if step > FRAME and step < RATE * 60:  # not a wrap or a restart of the stream
            lost += step // FRAME - 1
    offsets = tick_offsets(log)
    offsets = offsets[(offsets[:, 0] >= a) & (offsets[:, 0] < b)] if len(offsets) else offsets
    return {
        "packets": len(packets), "gap_ms": gap, "gap_at_s": gap_at, "lost_packets": int(lost), "ticks": len(offsets),
        "offset_ms": float(np.median(offsets[:, 1]) * 1000) if len(offsets) else float("nan"),
    }


def minute_row(minute: int, logs: list[CallLog], a: float, b: float, base_ms: list[float], tick_ms: float, delta: dict, rss: dict) -> dict:
    per_call = [window(log, a, b) for log in logs]
    drifts = [w["offset_ms"] - base for w, base in zip(per_call, base_ms) if w["ticks"] and base == base]
    gaps = [w["gap_ms"] for w in per_call if w["gap_ms"] == w["gap_ms"]]
    lag = [ms for t, ms in LOOP_LAG if a <= t < b]
    row = {
        "minute": minute,
        "calls": sum(w["packets"] > 0 for w in per_call),
        "drift ms": max(drifts, key=abs) if drifts else float("nan"),
        "drift ticks": max(abs(d) for d in drifts) / tick_ms if drifts else float("nan"),
        "longest gap ms": max(gaps) if gaps else float("nan"),
        "calls gap>40ms": sum(g > AIMS["gap_ms"] for g in gaps),
        "lost packets": sum(w["lost_packets"] for w in per_call),
        **{column: delta.get(key, 0) for key, column in KEYS.items()},
        **{f"rss {role} MB": mb for role, mb in rss.items()},
        "client lag ms": max(lag) if lag else float("nan"),
    }
    row["per_call"] = per_call
    return row


def rss_by_role(samples: list[dict], a: float, b: float, roles: dict[int, str]) -> dict[str, float]:
    """Mean resident MB per role (summed over its processes) of the samples in [a, b)."""
    out: dict[str, list[float]] = {}
    for s in samples:
        if a <= s["t"] < b:
            per_role: dict[str, float] = {}
            for pid, mb in s["rss_mb"].items():
                if mb is not None and pid in roles:
                    per_role[roles[pid]] = per_role.get(roles[pid], 0.0) + mb
            for role, mb in per_role.items():
                out.setdefault(role, []).append(mb)
    return {role: float(np.mean(v)) for role, v in sorted(out.items())}


def rss_growth(samples: list[dict], roles: dict[int, str], warm_until: float, end: float) -> list[dict]:
    """Per actor process: MB at start, after the warm-up, at the end (mean of the last 30 s), growth."""
    rows = []
    for pid, role in sorted(roles.items(), key=lambda kv: (kv[1], kv[0])):
        series = [(s["t"], s["rss_mb"].get(pid)) for s in samples if s["rss_mb"].get(pid) is not None]
        if not series:
            continue
        warm = [mb for t, mb in series if t >= warm_until] or [series[-1][1]]
        last = [mb for t, mb in series if t >= end - 30.0] or [series[-1][1]]
        base, final = warm[0], float(np.mean(last))
        rows.append({
            "actor": f"{role} ({pid})", "start MB": series[0][1], "after warm-up MB": base, "end MB": final,
            "peak MB": max(mb for _, mb in series), "growth %": (final / base - 1) * 100 if base else float("nan"), "samples": len(series),
        })
    return rows


# --- the plot ----------------------------------------------------------------------------------


def plot_rss(samples: list[dict], roles: dict[int, str], t_start: float, path: str) -> str:
    """RSS over time, one panel per actor process; -> the writer used."""
    series = []
    for pid, role in sorted(roles.items(), key=lambda kv: (kv[1], kv[0])):
        pts = [((s["t"] - t_start) / 60, s["rss_mb"][pid]) for s in samples if s["rss_mb"].get(pid) is not None]
        if pts:
            series.append((f"{role} {pid}", np.array(pts)))
    if not series:
        return "none"
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]  (optional: a plain raster without it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        from training.eval_report import write_png

        write_png(path, _raster(series))
        return "raster"
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (label, pts) in zip(axes[:, 0], series):
        ax.plot(pts[:, 0], pts[:, 1], marker=".")
        ax.set_ylabel("RSS MB")
        ax.set_title(label, loc="left", fontsize=9)
    axes[-1, 0].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _raster(series: list[tuple[str, np.ndarray]], width: int = 1000, panel_h: int = 150) -> np.ndarray:
    """Panels of RSS (MB) against minutes as an RGB image, labelled with a 3x5 pixel font."""
    left, right, top, gap = 120, 30, 30, 50
    height = top + len(series) * (panel_h + gap)
    img = np.full((height, width, 3), 255, np.uint8)
    t_max = max(float(pts[:, 0].max()) for _, pts in series) or 1.0
    colours = [(220, 110, 40), (60, 110, 200), (60, 160, 80), (150, 60, 160), (120, 120, 120)]
    for i, (label, pts) in enumerate(series):
        y0 = top + i * (panel_h + gap)
        lo, hi = float(pts[:, 1].min()), float(pts[:, 1].max())
        pad = max((hi - lo) * 0.1, hi * 0.01, 1.0)
        lo, hi = lo - pad, hi + pad
        img[y0 : y0 + panel_h, left : width - right] = (245, 245, 245)
        xs = left + pts[:, 0] / t_max * (width - left - right - 1)
        ys = y0 + panel_h - 1 - (pts[:, 1] - lo) / (hi - lo) * (panel_h - 1)
        for (xa, ya), (xb, yb) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            n = int(max(abs(xb - xa), abs(yb - ya))) + 1
            for x, y in zip(np.linspace(xa, xb, n), np.linspace(ya, yb, n)):
                img[int(round(y)) - 1 : int(round(y)) + 1, int(round(x)) : int(round(x)) + 2] = colours[i % len(colours)]
        _text(img, f"{label}  RSS MB", left, y0 - 20)
        _text(img, f"{hi:.0f}", 6, y0, scale=2)
        _text(img, f"{lo:.0f}", 6, y0 + panel_h - 10, scale=2)
        axis = y0 + panel_h
        img[axis, left : width - right] = 0
        for m in range(int(t_max) + 1):
            x = int(left + m / t_max * (width - left - right - 1))
            img[axis : axis + 5, x] = 0
            _text(img, str(m), x - 2, axis + 8, scale=2)
        _text(img, "MIN", 6, axis + 8, scale=2)
    return img


_MORE_GLYPHS = {
    "G": "011100101101011", "B": "110101110101110", "K": "101101110101101", "W": "101101101111101",
    "F": "111100110100100", "V": "101101101101010", "Y": "101101010010010", "X": "101101010101101",
    "-": "000000111000000", ".": "000000000000010", "_": "000000000000111", "%": "101001010100101",
}


def _text(img: np.ndarray, s: str, x: int, y: int, scale: int = 3) -> None:
    from training.eval_report import _GLYPHS

    glyphs = {**_GLYPHS, **_MORE_GLYPHS}
    for ch in s.upper():
        g = glyphs.get(ch)
        if g is not None:
            bits = np.array([int(c) for c in g], bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
            h, w = bits.shape
            view = img[y : y + h, x : x + w]
            view[bits[: view.shape[0], : view.shape[1]]] = 0
        x += 4 * scale


# --- the run -----------------------------------------------------------------------------------


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
