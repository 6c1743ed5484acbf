"""The soak's measurements: the server's actor processes, counters and memory, and the per-minute
figures cut from the calls' logs.

Server side: the Ray worker process of each actor (`actor_processes`, by process title), its
resident memory (`rss_mb`), the late / missing chunk counters of the interaction and ingress
actors (`counters`), and the callers' own event loop lag (`watch_loop`, into `LOOP_LAG`). Figures:
clock drift, gaps and lost packets per call (`window`), one table row a minute (`minute_row`), and
memory by role and its growth past the warm-up (`rss_by_role`, `rss_growth`).
"""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np

from bench.soak_calls import FRAME, RATE, CallLog

AIMS = {"drift_ticks": 1.0, "gap_ms": 40.0, "rss_growth_pct": 5.0}
ROLES = {"Interaction": "interaction", "Ingress": "ingress", "SessionLog": "session_log"}  # Ray process title -> role
_TITLE = re.compile(r"^ray::(" + "|".join(ROLES) + r")\b")


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
            stats = await asyncio.wait_for(asyncio.wrap_future(ref.future()), 10)
        except Exception:
            continue
        figures: dict = stats.totals if role == "interaction" else stats
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
