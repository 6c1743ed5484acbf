"""Hostile snippets through the real bubblewrap sandbox of the `python` tool (actors/background/sandbox.py).

Each payload tries one way out (files, /proc, the environment, the network, processes that
outlive the call, resource floods, ctypes, rlimits, signals) and is asserted to do no harm: what
it reads is not the host's, what it writes is not on the host, nothing it starts outlives the call,
and the host (this test process, other sandboxes) goes on unaffected. Skipped, with the reason,
only where `actors.background.sandbox.available()` says the isolation cannot be had here.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.background.sandbox import SANDBOX_UID, Sandbox
from actors.background.tools import ToolError
from tests.sandboxes import limits
from tests.waits import until, wait_for

REPO = Path(__file__).resolve().parents[3]
SECRET = "sk-interplay-escape-" + uuid.uuid4().hex
MEMORY_MB = 251  # an address-space limit no other test uses: its bytes in a command line mark this file's sandboxes
SIGNATURE = f"RLIMIT_AS\0{MEMORY_MB << 20}\0".encode()
MAX_PROCESSES = 12


@pytest.fixture(scope="module")
def box():
    os.environ["INTERPLAY_ESCAPE_SECRET"] = SECRET  # the server's environment holds a secret
    yield Sandbox(limits(memory_mb=MEMORY_MB, timeout_s=8, cpu_s=4, max_processes=MAX_PROCESSES, output_bytes=4096))
    os.environ.pop("INTERPLAY_ESCAPE_SECRET", None)


def attempt(box: Sandbox, code: str) -> str:
    """What the snippet printed, or "ToolError: ..." when it failed."""
    try:
        return asyncio.run(box.run(code))["stdout"]
    except ToolError as exc:
        return f"ToolError: {exc}"


def sandbox_pids() -> list[int]:
    """Host processes of this file's sandboxes (bwrap and everything inside), by their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if SIGNATURE in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def none_left() -> None:
    wait_for(lambda: not sandbox_pids(), message=lambda: f"sandbox processes still alive: {sandbox_pids()}")


def marker(base: Path | str) -> Path:
    return Path(base) / f"interplay-escape-{uuid.uuid4().hex}"


# --- files -----------------------------------------------------------------------------------


def test_it_cannot_read_the_hosts_files(box):
    for path in ("/etc/passwd", "/etc/shadow", "/etc/hostname", str(REPO / "pyproject.toml"), str(REPO / "actors" / "tools.py"), "/root/.bashrc", "/home"):
        out = attempt(box, f"print(open({path!r}).read())")
        assert "ToolError" in out and ("FileNotFoundError" in out or "IsADirectoryError" in out), (path, out)
    assert "root:" not in attempt(box, "print(open('/etc/passwd').read())")
    top = eval(attempt(box, "import os; print(sorted(os.listdir('/')))"))  # our own print of a list of names
    assert {"dev", "proc", "usr"} <= set(top) and not {"etc", "home", "tmp", "var", "work", "run", "mnt", "opt"} & set(top), top


def test_it_cannot_see_the_virtualenv_or_import_site_packages(box):
    venv = Path(sys.prefix)
    assert venv != Path(sys.base_prefix), "the tests run in the project's virtualenv"
    out = attempt(box, f"import os; print(os.path.exists({str(venv)!r}), os.path.exists({str(REPO)!r}))")
    assert out.strip() == "False False"
    site_packages = [p for p in sys.path if p.endswith("-packages")]
    code = (
        f"import sys, site\nsys.path[:0] = {site_packages!r} + ['/usr/lib/python3/dist-packages', '/usr/local/lib/python3/dist-packages']\n"
        "site.main()\n"
        "for name in ('ray', 'numpy', 'torch', 'pydantic', 'pytest', 'hypothesis'):\n"
        "    try:\n        __import__(name); print('IMPORTED', name)\n"
        "    except ImportError:\n        print('no', name)\n"
    )
    out = attempt(box, code)
    assert "IMPORTED" not in out and out.count("no ") == 6, out


def test_nothing_it_writes_reaches_the_host(box, tmp_path):
    targets = [marker("/tmp"), marker(REPO), marker(tmp_path), marker(Path.cwd()), marker("/dev/shm"), Path(f"interplay-escape-{uuid.uuid4().hex}")]
    for target in targets:
        out = attempt(box, f"open({str(target)!r}, 'w').write('x'); print('WROTE')")
        assert "WROTE" not in out and ("Read-only file system" in out or "FileNotFoundError" in out), (target, out)
        assert not target.exists() and not (Path.cwd() / target).exists()


def test_many_small_files_or_one_huge_file_fill_nothing(box):
    out = attempt(box, (
        "import os\nmade = 0\n"
        "for d in ('/', '/dev', '/dev/shm', '/proc', '/usr/lib'):\n"
        "    for i in range(1000):\n"
        "        try:\n            open(f'{d}/f{i}', 'w').close(); made += 1\n"
        "        except OSError:\n            break\n"
        "print('made', made)\n"
    ))
    assert out.strip() == "made 0"
    # The one kind of file it can make is an anonymous one in memory: capped by RLIMIT_FSIZE and open files.
    out = attempt(box, (
        "import os, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "fd = os.memfd_create('big')\n"
        "try:\n    while True: os.write(fd, b'x' * (1 << 20))\nexcept OSError as exc:\n    print('stopped at', os.fstat(fd).st_size, exc.errno)\n"
    ))
    assert out.strip() == f"stopped at {1 << 20} 27", out  # EFBIG at 1 MiB


def test_dev_has_no_devices_beyond_the_harmless_ones(box):
    out = attempt(box, (
        "import os\nprint(sorted(os.listdir('/dev')))\n"
        "for p in ('/dev/mem', '/dev/kmem', '/dev/kmsg', '/dev/vda', '/dev/sda', '/dev/nvidia0', '/dev/fuse', '/dev/net/tun'):\n"
        "    print(p, os.path.exists(p))\n"
    ))
    listed = eval(out.splitlines()[0])  # our own print of a list of names
    assert set(listed) <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr", "core"}
    assert all(line.endswith("False") for line in out.splitlines()[1:]), out


# --- /proc and the environment ---------------------------------------------------------------


def test_proc_shows_only_its_own_processes_and_no_environment(box):
    host = os.getpid()
    out = attempt(box, (
        "import os\npids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\nprint(pids)\n"
        f"for p in pids + [{host}, {os.getppid()}]:\n"
        "    try:\n        print(p, open(f'/proc/{p}/environ', 'rb').read())\n"
        "    except OSError as exc:\n        print(p, type(exc).__name__)\n"
        "print(dict(os.environ))\n"
    ))
    assert SECRET not in out and "INTERPLAY_ESCAPE_SECRET" not in out
    pids = eval(out.splitlines()[0])
    assert pids == [1, 2], out  # bwrap's init and the snippet itself
    assert f"{host} FileNotFoundError" in out


def test_it_runs_as_nobody_with_no_capabilities(box):
    out = attempt(box, "import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint([l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'NoNewPrivs'))])")
    assert out.splitlines()[0] == f"{SANDBOX_UID} {SANDBOX_UID} []", out
    assert "CapEff:\\t0000000000000000" in out and "CapPrm:\\t0000000000000000" in out and "NoNewPrivs:\\t1" in out, out


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root server starts bwrap as another uid")
def test_under_a_root_server_no_sandbox_process_is_host_root(box):
    async def main():
        run = asyncio.create_task(box.run("import time; time.sleep(60)"))
        pids = await until(lambda: run.done() or sandbox_pids())
        assert not run.done(), run.exception()
        uids = {int(re.search(r"Uid:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1)) for p in pids}
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        return uids

    assert asyncio.run(main()) == {SANDBOX_UID}
    none_left()


# --- network -----------------------------------------------------------------------------------


def test_it_cannot_reach_a_server_on_the_hosts_loopback(box):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        out = attempt(box, (
            "import socket\n"
            f"for host in ('127.0.0.1', 'localhost', '0.0.0.0', '::1'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {port}), timeout=2); print('CONNECTED', host)\n"
            "    except OSError as exc:\n        print('refused', host, type(exc).__name__)\n"
        ))
        assert "CONNECTED" not in out and out.count("refused") == 4, out
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # the server saw no connection
            server.accept()
    finally:
        server.close()


def test_a_port_it_binds_is_its_own_and_no_abstract_socket_of_the_host_is_reachable(box):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    name = f"\0interplay-escape-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(name)
    unix.listen()
    try:
        out = attempt(box, (
            "import socket\ns = socket.create_server(('127.0.0.1', %d)); print('bound its own', s.getsockname()[1])\n"
            "u = socket.socket(socket.AF_UNIX)\n"
            "try:\n    u.connect(%r); print('CONNECTED')\nexcept OSError as exc:\n    print('unix', type(exc).__name__)\n"
            "for f in (socket.AF_INET, socket.AF_INET6):\n"
            "    try:\n        socket.socket(f, socket.SOCK_DGRAM).sendto(b'x', ('8.8.8.8' if f == socket.AF_INET else '2001:4860:4860::8888', 53)); print('SENT')\n"
            "    except OSError as exc:\n        print('udp', exc.errno)\n"
        ) % (port, name))
        # The host's listener holds the port, yet the sandbox bound it: a network namespace of its own.
        assert f"bound its own {port}" in out and "CONNECTED" not in out and "SENT" not in out, out
        unix.setblocking(False)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            unix.accept()
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        unix.close()


def test_dns_does_not_resolve(box):
    out = attempt(box, (
        "import socket\nfor host in ('example.com', 'pypi.org', 'metadata.google.internal', 'kubernetes.default.svc'):\n"
        "    try:\n        print('RESOLVED', socket.getaddrinfo(host, 80))\n"
        "    except OSError as exc:\n        print('no', host)\n"
    ))
    assert "RESOLVED" not in out and out.count("no ") == 4, out


# --- processes -------------------------------------------------------------------------------


def test_no_shell_and_no_programs_to_run(box):
    out = attempt(box, (
        "import os, subprocess\n"
        "for argv in (['/bin/sh', '-c', 'echo pwned'], ['sh', '-c', 'echo pwned'], ['/usr/bin/env'], ['/usr/bin/python3', '-c', 'print(1)']):\n"
        "    try:\n        subprocess.run(argv); print('RAN', argv)\n"
        "    except OSError as exc:\n        print('no', type(exc).__name__)\n"
        "print('system', os.system('echo pwned'))\n"
    ))
    assert "RAN" not in out and "pwned" not in out and out.count("no FileNotFoundError") == 4, out


def test_subclasses_tricks_reach_nothing_more(box):
    out = attempt(box, (
        "classes = ().__class__.__base__.__subclasses__()\n"
        "popen = [c for c in classes if c.__name__ == 'Popen']\n"
        "wrap = [c for c in classes if c.__name__ == '_wrap_close']\n"
        "if not popen:\n    import subprocess; popen = [subprocess.Popen]\n"
        "try:\n    popen[0](['/bin/sh', '-c', 'echo pwned']).wait(); print('RAN')\nexcept OSError as exc:\n    print('no', type(exc).__name__)\n"
        "if wrap:\n    print('system', wrap[0].__init__.__globals__['system']('echo pwned'))\n"
    ))
    assert "RAN" not in out and "pwned" not in out and "no FileNotFoundError" in out, out


def test_a_forked_child_does_not_outlive_the_call(box, tmp_path):
    target = marker(tmp_path)
    out = attempt(box, (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(600)\n"
        f"    open({str(target)!r}, 'w').write('survived')\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    ))
    assert out.strip() == "parent done"
    none_left()
    assert not target.exists()


def test_a_setsid_double_fork_ignoring_sigterm_does_not_outlive_the_call(box):
    out = attempt(box, (
        "import os, signal, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.wait()\nprint('parent done')\n"
    ))
    assert out.strip() == "parent done"
    none_left()


def test_a_fork_bomb_is_stopped_at_the_process_limit_and_others_run_afterwards(box):
    async def main():
        bomb = asyncio.create_task(box.run(
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        ))
        most = 0
        while not bomb.done():  # watch how many processes it reaches until it is stopped
            most = max(most, len(sandbox_pids()))
            await asyncio.sleep(0.01)
        with pytest.raises(ToolError, match="limit"):
            await bomb
        return most

    most = asyncio.run(main())
    assert most <= MAX_PROCESSES + 1  # its namespace's processes, and bwrap outside it
    none_left()
    assert attempt(box, "print(6 * 7)").strip() == "42"


def test_it_cannot_signal_or_trace_the_host(box):
    host = os.getpid()
    out = attempt(box, (
        "import os, ctypes, signal\n"
        "libc = ctypes.CDLL('libc.so.6', use_errno=True)\n"
        "print('uid', libc.getuid(), 'ppid', os.getppid())\n"
        f"for pid in ({host}, {os.getppid()}, 1):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL); print('killed', pid)\n"
        "    except OSError as exc:\n        print('kill', pid, type(exc).__name__)\n"
        f"print('ctypes kill', libc.kill({host}, 9), ctypes.get_errno())\n"
        f"print('ptrace', libc.ptrace(16, {host}, 0, 0), ctypes.get_errno())\n"  # PTRACE_ATTACH
        "print('unshare', libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER: no new user namespaces
    ))
    lines = out.splitlines()
    assert lines[0] == f"uid {SANDBOX_UID} ppid 1", out
    assert f"kill {host} ProcessLookupError" in out
    assert "ctypes kill -1 3" in out and "ptrace -1" in out and "unshare -1" in out, out
    assert os.getppid() > 1  # this test process and its parent are alive


def test_it_cannot_raise_its_limits_back(box):
    out = attempt(box, (
        "import resource\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NPROC', 'RLIMIT_NOFILE', 'RLIMIT_FSIZE'):\n"
        "    r = getattr(resource, name)\n"
        "    try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print('RAISED', name)\n"
        "    except (ValueError, OSError):\n        print('kept', name)\n"
        "x = bytearray(1 << 30)\n"
    ))
    assert "RAISED" not in out and "memory limit" in out, out


# --- floods and time -------------------------------------------------------------------------


def test_a_memory_flood_is_stopped(box):
    for code in ("x = bytearray(1 << 30)", "xs = []\nwhile True: xs.append(bytearray(1 << 20))", "x = 'a' * (1 << 31)"):
        assert "memory limit" in attempt(box, code)


def test_an_output_flood_is_cut_at_the_cap_without_the_host_holding_it(box):
    def peak_kib():
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    def rss_kib():
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    attempt(box, "print('warm')")  # the first run's imports and loop are not the flood's
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak from the current size
    before = rss_kib()
    result = asyncio.run(box.run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(150): sys.stdout.write(chunk)\n"))
    assert result == {"stdout": "x" * box.limits.output_bytes, "exit": None, "truncated": True}
    assert peak_kib() - before < 8 * 1024, f"the host grew by {peak_kib() - before} KiB reading 150 MiB of output"
    out = attempt(box, "import sys\nchunk = 'e' * (1 << 20)\nfor _ in range(150): sys.stderr.write(chunk)\n")
    assert "error output passed" in out
    none_left()


def test_ignoring_signals_it_still_ends_at_the_time_limit(box):
    out = attempt(box, (
        "import signal, time\n"
        "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "while True:\n    time.sleep(1)\n"
    ))
    assert "time limit" in out
    none_left()


def test_a_cpu_loop_ends_at_the_cpu_limit(box):
    assert "limit" in attempt(box, "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass")
    none_left()


def test_the_sandbox_dies_with_the_server():
    """A server process killed outright (no cleanup runs) takes its running sandboxes with it."""
    lim = limits(memory_mb=MEMORY_MB, timeout_s=600)
    server = subprocess.Popen([sys.executable, "-c", (
        "import asyncio\nfrom actors.background.sandbox import SandboxLimits, run_python\n"
        f"asyncio.run(run_python('import time; time.sleep(600)', SandboxLimits(python={lim.python!r}, memory_mb={MEMORY_MB}, timeout_s=600)))\n"
    )], cwd=REPO)
    try:
        wait_for(lambda: len(sandbox_pids()) >= 3)  # bwrap, its init and the snippet
        server.kill()
        server.wait()
        none_left()
        assert not sandbox_pids()
    finally:
        server.kill()
        server.wait()


# --- anything at all -------------------------------------------------------------------------

FRAGMENTS = [
    "import os", "import socket", "import ctypes", "import subprocess", "import signal", "import resource",
    "os.fork()", "os.setsid()", "print(open('/etc/passwd').read())", "print(os.environ)",
    "open('/tmp/interplay-escape-prop', 'w').write('x')", "socket.create_connection(('127.0.0.1', 22), timeout=1)",
    "subprocess.run(['/bin/sh', '-c', 'id'])", "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
    "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "x = bytearray(1 << 28)", "print('y' * 100000)",
    "ctypes.CDLL('libc.so.6').kill(1, 9)", "os.kill(os.getppid(), 9)", "print(os.listdir('/proc'))", "raise SystemExit(3)",
    "while False: pass", "for _ in range(3): os.fork() if hasattr(os, 'fork') else None",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lines=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=40)), min_size=1, max_size=6))
def test_any_program_gives_a_result_or_a_tool_error_and_leaves_nothing_behind(box, lines):
    try:
        result = asyncio.run(box.run("\n".join(lines)))
        assert set(result) <= {"stdout", "exit", "truncated"} and isinstance(result["stdout"], str)
        out = result["stdout"]
    except ToolError as exc:
        out = str(exc)
    assert SECRET not in out and "root:x:0:0" not in out
    assert not Path("/tmp/interplay-escape-prop").exists()
    none_left()
