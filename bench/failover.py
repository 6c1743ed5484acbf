"""Failover: kill interaction actors (and a node) under live WebRTC calls; how long until output resumes.

    python -m bench.failover [--calls 4] [--kills 3] [--snapshot-s 1]

Starts a Ray cluster of its own on this machine with `ray start` nodes, each offering one unit
of the `interaction` resource (so one interaction actor each), and the app on it (the untrained
`tiny` model, `interaction.max_sessions` 2, background pool off). Then, with `--calls` WebRTC
calls up (aiortc peers over loopback playing speech, `interplay.tick` events on):

1. capacity: the calls fill both actors and one more call is refused (503); a third node joins
   and, with no restart, the same call is taken (on the new actor), then hung up;
2. kills: `--kills` times, the interaction actor with the most calls is killed (`ray.kill`, Ray
   restarts it); resume time = from the kill to the first `interplay.tick` event of each of its
   calls for a tick after the kill (every wait included: detection, placement, the rebuild from
   the log, the first exchange and delivery);
3. a node leaves: every process of a node holding calls is killed; its calls resume elsewhere;
5. (after 4) the ingress actor is killed: its calls end with it, every slot they held is
   released, and the restarted ingress takes a new call;
4. the log: each call's log is read back; its indices and ticks run in order with no duplicate,
   and the logged outputs equal what a fresh engine produces from the logged inputs alone,
   stepping the session by itself, before and after every resume: controls and text exactly,
   audio level within 1 %. The waveform itself is counted too (ticks equal to the sample within
   `--lsb`), not required: a session stepped in a batch and the same one stepped alone differ
   in the last bits of float32 arithmetic, and the vocoder's phase tracking can carry such a
   difference on as a different phase at the same level.

Prints a table, writes bench/results/failover.json; exits 1 if a call was lost or an output
differs. Aim: every resume within 2 s.

The cluster is `bench/local_cluster.py`'s; the log check (step 4) is `bench/failover_log.py`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from typing import cast

from bench.common import actor, percentiles, print_table, write_json
from bench.failover_log import check_logs
from bench.local_cluster import LocalCluster
from bench.soak_calls import KEY, CallLog, soak_call
from protocols.seams import InteractionStats


def say(message: str) -> None:
    print(f"[failover] {message}", flush=True)


# --- the scenario -------------------------------------------------------------------------------


async def wait_until(predicate, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.time() + timeout_s
    while True:
        result = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if result:
            return result
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(every_s)


async def recovered(router, settle_s: float) -> None:
    """Faults are spaced out: the next comes once every interaction actor answers again (a killed
    one has restarted), and `settle_s` later."""
    import ray

    from deployments.app import NAMESPACE

    async def all_answer() -> bool:
        names = list((await router.stats.remote())["actors"])
        try:
            await asyncio.wait_for(asyncio.gather(*(ray.get_actor(n, namespace=NAMESPACE).clock_info.remote() for n in names)), 2.0)
            return True
        except Exception:
            return False

    try:
        await wait_until(all_answer, 60, "every interaction actor answering", every_s=0.5)
    except TimeoutError:
        say("an interaction actor is still not answering; going on")
    await asyncio.sleep(settle_s)


async def after_fault(fault, sessions: list[str], logs: list[CallLog], clock, router, timeout_s: float) -> dict:
    """Cause `fault` (a function) and wait up to `timeout_s` for the calls of `sessions` to resume:
    {"calls", "resume_s" (None: not resumed), "now_on" (the actors holding them after)}."""
    t_kill = time.time()
    fault()
    kill_tick = clock.tick_at(t_kill)
    mine = [log for log in logs if log.session_id in sessions]
    try:
        await wait_until(lambda: all(resumed_at(log, kill_tick + 1, t_kill) is not None for log in mine), timeout_s, "calls resuming")
    except TimeoutError:
        pass
    after = await router.placements.remote()
    times = [resumed_at(log, kill_tick + 1, t_kill) for log in mine]
    return {"calls": len(mine), "resume_s": times, "now_on": sorted({after.get(s, "?") for s in sessions})}


def resumed_at(log: CallLog, after_tick: int, t_kill: float) -> float | None:
    """Seconds from the kill to the first tick event (arriving after it) for a tick after `after_tick`."""
    for tick, arrival in log.ticks:
        if tick > after_tick and arrival > t_kill:
            return arrival - t_kill
    return None


async def scenario(args) -> dict:
    import ray

    from deployments import app as deployment
    from deployments.config import AppConfig
    from examples.call import post_offer, resample
    from bench.e2e import speech

    cluster = LocalCluster()
    report: dict = {"kills": [], "node_leave": None, "capacity": {}, "log": {}}
    say(f"starting a 2-node Ray cluster in {cluster.temp_dir} ...")
    cluster.start_head(4, {"interaction": 1, "session_log": 1, "router": 1, "ingress": 4})  # as cluster.yaml: the log, router and ingress on the head
    node2 = cluster.add_node(2, {"interaction": 1})
    try:
        # This driver joins our own cluster only, whatever Ray settings it inherited (a test's
        # cluster address or auth token).
        os.environ.pop("RAY_ADDRESS", None)
        os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
        ray.init(address=cluster.address, namespace=deployment.NAMESPACE, logging_level=logging.ERROR, log_to_driver=False, _node_ip_address="127.0.0.1")
        folder = tempfile.mkdtemp(prefix="interplay-failover-")
        config = AppConfig.model_validate({
            "model": {"preset": "tiny", "checkpoint": None}, "log": {"root": f"{folder}/log"}, "http": {"port": args.port},
            "auth": {"api_keys": [KEY]}, "background": {"enabled": False},
            "interaction": {"max_sessions": 2, "snapshot_s": args.snapshot_s},
        })
        app = deployment.build(config)
        for name, status in app.parts.items():
            say(f"{name:<12} {status}")
        url, clock = f"http://127.0.0.1:{args.port}", app.clock
        if app.router is None:
            raise RuntimeError("the app started no router")
        router = actor(app.router)

        samples16, rate = speech(8.0, folder)
        samples = resample(samples16, rate)
        logs = [CallLog(i) for i in range(args.calls)]
        until = time.time() + 3600
        tasks = [asyncio.create_task(soak_call(url, log, samples, until, respond_every_s=6.0)) for log in logs]
        await wait_until(lambda: all(len(log.ticks) > 10 or log.error for log in logs), 90, "every call hearing ticks")
        lost = [log.error for log in logs if log.error]
        if lost:
            raise RuntimeError(f"calls failed to start: {lost}")
        say(f"{args.calls} calls up: {(await router.stats.remote())['actors']}")

        # 1. capacity: full, refused, a node joins, taken.
        from aiortc import RTCPeerConnection

        async def offer() -> int:
            pc = RTCPeerConnection()
            pc.addTransceiver("audio")
            pc.createDataChannel("oai-events")
            await pc.setLocalDescription(await pc.createOffer())
            status, _, location = await asyncio.to_thread(post_offer, url, pc.localDescription.sdp, KEY)
            await pc.close()
            if status == 201:
                await asyncio.to_thread(_hangup, url, location)
            return status

        async def offer_until_taken(within_s: float) -> tuple[int, int]:
            """Offer as a client told "Retry-After" would, until taken or `within_s` passed: (status, tries)."""
            deadline, tries = time.time() + within_s, 0
            while True:
                status, tries = await offer(), tries + 1
                if status != 503 or time.time() > deadline:
                    return status, tries
                await asyncio.sleep(1.0)

        refused = await offer()
        t = time.time()
        node3 = cluster.add_node(2, {"interaction": 1})
        await wait_until(lambda: _actors(router) >= 3, 60, "the router growing onto the new node")
        grown_s = time.time() - t
        # The new actor may refuse a few seconds more (its first steps run hot while it warms up on
        # a loaded machine): a client retries on 503 as told.
        taken, tries = await offer_until_taken(30.0)
        taken_s = time.time() - t
        report["capacity"] = {"full_status": refused, "after_node_joined_status": taken, "grown_in_s": round(grown_s, 1),
                              "taken_in_s": round(taken_s, 1), "offers": tries}
        say(f"capacity: full -> HTTP {refused}; a node joined, actor added in {grown_s:.1f} s -> HTTP {taken} "
            f"({tries} offer{'s' if tries > 1 else ''}, {taken_s:.1f} s after the node joined)")

        # 2. kills.
        for k in range(args.kills):
            await recovered(router, args.settle_s)
            where = await router.placements.remote()
            counts: dict[str, list[str]] = {}
            for sid, name in where.items():
                counts.setdefault(name, []).append(sid)
            victim = max(sorted(counts), key=lambda n: len(counts[n]))
            handle = ray.get_actor(victim, namespace=deployment.NAMESPACE)
            fault = await after_fault(lambda: ray.kill(handle, no_restart=False), counts[victim], logs, clock, router, 20)
            report["kills"].append({"actor": victim, **fault})
            say(f"kill {k + 1}: {victim} with {fault['calls']} calls -> resumed in {_fmt(fault['resume_s'])} on {fault['now_on']}")

        # 3. a node leaves: a worker node (not the head) whose actor has calls.
        await recovered(router, args.settle_s)
        where = await router.placements.remote()
        ports = {name: _node_port(name) for name in sorted(set(where.values()))}
        leaving = next((port for port in (node2, node3) if port in ports.values()), None)
        if leaving is not None:
            on_node = [name for name, port in ports.items() if port == leaving]
            sessions = [sid for sid, name in where.items() if name in on_node]
            killed: list[int] = []
            fault = await after_fault(lambda: killed.append(cluster.kill_node(leaving)), sessions, logs, clock, router, 30)
            report["node_leave"] = {"actors": on_node, "processes_killed": killed[0], **fault}
            say(f"node left ({on_node}, {killed[0]} processes): {fault['calls']} calls resumed in {_fmt(fault['resume_s'])} on {fault['now_on']}")
        else:
            say(f"no calls on a worker node ({ports}); node-leave step skipped")

        # 4. the log, before hanging up.
        await asyncio.sleep(1.0)
        report["log"] = await check_logs(app, [log.session_id for log in logs], args.lsb)
        report["calls_alive"] = sum(1 for log in logs if not log.error)
        report["errors"] = [log.error for log in logs if log.error]

        # 5. the ingress dies: its calls end with it; every slot they held is released (the
        # interaction actors let sessions no chunk comes for go, the router forgets them), and
        # the restarted ingress takes a new call.
        t_kill = time.time()
        ray.kill(app.ingress, no_restart=False)
        try:
            await wait_until(lambda: _placed(router) == 0, 60, "slots released after the ingress died")
        except TimeoutError:
            pass
        released_s = time.time() - t_kill if _placed(router) == 0 else None
        ended = sum(1 for log in logs if log.error)
        after = await offer()
        report["ingress_kill"] = {"slots_released_s": released_s, "calls_ended": ended, "new_call_status": after}
        say(f"ingress killed: slots released in {released_s if released_s is None else round(released_s, 1)} s, "
            f"{ended}/{len(logs)} calls saw their connection end, a new call -> HTTP {after}")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            deployment.stop(app)
        except Exception:
            pass
        ray.shutdown()
    except BaseException:
        import traceback

        traceback.print_exc()  # now: the driver does not outlive the cluster's shutdown below
        sys.stdout.flush()
        sys.stderr.flush()
        raise
    finally:
        try:
            ray.shutdown()
        except Exception:
            pass
        cluster.shutdown()
    return report


def _hangup(url: str, location: str | None) -> None:
    import urllib.request

    if location:
        request = urllib.request.Request(f"{url}{location}/hangup", method="POST", headers={"Authorization": f"Bearer {KEY}"})
        try:
            urllib.request.urlopen(request, timeout=10).read()
        except Exception:
            pass


def _placed(router) -> int:
    import ray

    return cast(dict, ray.get(router.stats.remote()))["sessions"]


def _actors(router) -> int:
    import ray

    return len(cast(dict, ray.get(router.stats.remote()))["actors"])


def _node_port(actor_name: str) -> int | None:
    """The node-manager port of the node an interaction actor runs on (now)."""
    import ray

    from deployments.app import NAMESPACE

    try:
        node_id = cast(InteractionStats, ray.get(ray.get_actor(actor_name, namespace=NAMESPACE).stats.remote(), timeout=5)).node_id
    except Exception:
        return None
    for node in ray.nodes():
        if node["NodeID"] == node_id and node["Alive"]:
            return node.get("NodeManagerPort")
    return None


def _fmt(times: list) -> str:
    ok = [t for t in times if t is not None]
    lost = len(times) - len(ok)
    text = ", ".join(f"{t:.2f} s" for t in ok) or "-"
    return text + (f" ({lost} not resumed)" if lost else "")


def summarise(report: dict) -> list[dict]:
    rows = []
    kills = [t for k in report["kills"] for t in k["resume_s"]]
    for label, times in (("actor killed", kills), ("node left", (report.get("node_leave") or {}).get("resume_s", []))):
        ok = [t for t in times if t is not None]
        p = percentiles([t * 1000 for t in ok]) if ok else {}
        rows.append({"event": label, "calls": len(times), "resumed": len(ok), "p50 ms": p.get("p50"), "worst ms": max(ok) * 1000 if ok else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--snapshot-s", type=float, default=1.0)
    parser.add_argument("--settle-s", type=float, default=3.0, help="calls run this long between faults")
    parser.add_argument("--lsb", type=int, default=2, help="audio samples may differ by this much (float rounding of a batch of one vs many)")
    parser.add_argument("--port", type=int, default=8141)
    parser.add_argument("--name", default="failover")
    args = parser.parse_args(argv)
    report = asyncio.run(scenario(args))
    rows = summarise(report)
    print_table(rows, ["event", "calls", "resumed", "p50 ms", "worst ms"])
    log = report["log"]
    say(f"log: {log}")
    path = write_json(args.name, {"args": vars(args), "report": report, "table": rows})
    say(f"wrote {path}")
    every = [t for k in report["kills"] for t in k["resume_s"]] + list((report.get("node_leave") or {}).get("resume_s", []))
    ok = all(t is not None for t in every) and log.get("control_or_text_mismatches", 1) == 0 and log.get("level_mismatches", 1) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
