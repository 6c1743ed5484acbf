"""`LocalCluster`: a Ray cluster of its own on this machine, started node by node with `ray start`.

Its nodes live in a temp dir of their own (so no other Ray user on the machine attaches to them),
listen on loopback only, and are told apart by their node-manager ports: a worker node can be
added, and killed with every process under it, as a machine leaving would. `shutdown` kills
every process of the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    """Ray nodes started here with `ray start`, in a temp dir of their own (so no other Ray user on
    the machine attaches to them). Nodes are told apart by their node-manager ports."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="fo-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.port = _free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        self.env.pop("RAY_ADDRESS", None)
        self.address = f"127.0.0.1:{self.port}"

    def start_head(self, num_cpus: int, resources: dict) -> None:
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false"], num_cpus, resources)

    def add_node(self, num_cpus: int, resources: dict) -> int:
        """Start a worker node; -> its node-manager port."""
        port = _free_port()
        self._start([f"--address={self.address}", f"--node-manager-port={port}"], num_cpus, resources)
        return port

    def _start(self, args: list[str], num_cpus: int, resources: dict) -> None:
        # Loopback only: the test suite runs in a network namespace with nothing else.
        # A small object store each: several nodes (and maybe a test's own cluster) share this machine's memory.
        cmd = [RAY, "start", *args, "--node-ip-address=127.0.0.1", "--object-store-memory=400000000", f"--num-cpus={num_cpus}", "--resources", json.dumps(resources), "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        # Not through pipes: the daemons `ray start` leaves behind inherit them and would die of
        # SIGPIPE on their next write once this process stops reading.
        subprocess.run(cmd, check=True, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=180)

    def kill_node(self, node_manager_port: int) -> int:
        """SIGKILL a worker node's raylet and every process under it; -> how many were killed."""
        import psutil

        killed = 0
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "raylet" in cmd and f"--node_manager_port={node_manager_port}" in cmd:
                for p in [*proc.children(recursive=True), proc]:
                    try:
                        p.kill()
                        killed += 1
                    except psutil.Error:
                        pass
        return killed

    def shutdown(self) -> None:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    if self.temp_dir.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                        os.kill(int(entry), signal.SIGKILL)
                except (OSError, ProcessLookupError):
                    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
