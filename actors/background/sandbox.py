"""The `python` tool's sandbox: a snippet runs in a bubblewrap (`bwrap`) container of its own.

`Sandbox(limits).run(code)` runs `code` with the Python interpreter `limits.python` (default: the
server's own base interpreter) inside bwrap and returns `{"stdout": <text>, "exit": <status>}`
(with `"truncated": true` and `"exit": None` when its output passed the cap and it was stopped);
everything else (an exception in the snippet, a limit, the sandbox failing to start, too many
sandboxes at once) is a `ToolError` with a one-line message.

The isolation contract. The snippet runs as uid/gid 65534 in new user, PID, network, IPC, UTS and
cgroup namespaces, with no capabilities and no way to make further user namespaces
(`--disable-userns`), in a new session, with an empty environment and `python -I -S`. It sees:
- a filesystem that is read-only everywhere: the interpreter's executable, its standard library
  (its `site-packages`, and every `*-packages` directory under /usr/lib, hidden by empty
  read-only mounts), its libpython, and /usr/lib, /usr/lib64, /lib, /lib64 for shared libraries;
  no /etc, /home, /root, /tmp, /var, /work, no repository, no virtualenv, no log directory;
- /proc of its own PID namespace only (its own processes), and a minimal read-only /dev (null,
  zero, full, random, urandom, tty, an empty /dev/shm);
- a network namespace with only its own loopback: no route anywhere, not even the host's
  loopback; no DNS (no /etc/resolv.conf, no address to reach).
It is limited by rlimits that a trusted bootstrap sets before running the snippet (soft = hard,
so it cannot raise them): address space `memory_mb`, CPU time `cpu_s`, file size 1 MiB, 64 open
files, no core files, `max_processes` processes and threads; and by a wall-clock `timeout_s`.
Its stdout and stderr are read as they come, each up to `output_bytes`; past that it is stopped.
When bwrap's first process ends (the snippet returned, or was stopped) the kernel kills every
process left in its PID namespace, so nothing it started survives a call; bwrap dies with the
server (`--die-with-parent`). When the server runs as root, bwrap itself is started as uid/gid
65534 with no supplementary groups, so no sandbox process maps back to host root (under host
root, RLIMIT_NPROC would not count); the interpreter must then be readable by that uid.

`available(python, bwrap)` runs a probe snippet through the same sandbox and returns why the
isolation cannot be had here (None when it can): enabling the tool where it says so is refused at
start-up, never run unisolated. At most `max_running` snippets run at once per `Sandbox` (one per
background actor): a call past that is refused at once with a ToolError, so a busy pool never
queues work it cannot start.
"""

from __future__ import annotations

import asyncio
import functools
import glob
import json
import os
import shutil
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass

from actors.background.errors import ToolError

SANDBOX_UID = 65534  # nobody
MAX_CODE_BYTES = 64 * 1024
FILE_BYTES = 1 << 20  # RLIMIT_FSIZE: nothing is writable; this bounds memfd files
OPEN_FILES = 64
HINT = ("install bubblewrap 0.8 or newer (apt-get install bubblewrap) and allow unprivileged user namespaces "
        "(user.max_user_namespaces > 0; on Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), "
        "or leave background.sandbox.enabled off")


@dataclass(frozen=True)
class SandboxLimits:
    """What a snippet may use, and where the sandbox's parts are (see the module docstring)."""

    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 4  # RLIMIT_CPU
    memory_mb: int = 256  # RLIMIT_AS
    output_bytes: int = 16 * 1024  # of stdout, and again of stderr; past it the snippet is stopped
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads, bwrap's own two included
    max_running: int = 4  # snippets at once per Sandbox
    python: str | None = None  # the interpreter inside; None: the server's own base interpreter
    bwrap: str = "bwrap"


# Runs inside the sandbox, as its first Python code: reads the snippet, fixes the limits so the
# snippet cannot raise them, then runs it as __main__.
BOOTSTRAP = """\
import resource, sys
source = sys.stdin.buffer.read()
for name, value in zip(sys.argv[1::2], sys.argv[2::2]):
    resource.setrlimit(getattr(resource, name), (int(value), int(value)))
sys.argv = ["-c"]
exec(compile(source, "<python>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""

# What the interpreter needs bound: asked of the interpreter itself, on the host.
_LAYOUT = """\
import json, site, sysconfig
lib = sysconfig.get_config_vars()
shared = lib.get("Py_ENABLE_SHARED") and lib.get("LIBDIR") and lib.get("INSTSONAME")
print(json.dumps({"stdlib": sorted({sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}),
                  "libpython": shared and lib["LIBDIR"] + "/" + lib["INSTSONAME"], "site": site.getsitepackages()}))
"""

# The probe `available` runs: the sandbox must look like the contract says.
_PROBE = """\
import os, socket
print((os.getuid(), os.getgid(), [n for _, n in socket.if_nameindex()], os.path.exists("/etc"), os.path.exists("/tmp")))
"""
_PROBE_OK = str((SANDBOX_UID, SANDBOX_UID, ["lo"], False, False))


def base_python() -> str:
    """The server's own interpreter without its virtualenv (whose packages stay outside)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=8)
def layout(python: str) -> dict:
    """The paths `python` needs: executable, standard library, libpython, its site directories."""
    executable = os.path.realpath(shutil.which(python) or python)
    out = subprocess.run([executable, "-I", "-S", "-c", _LAYOUT], capture_output=True, text=True, timeout=60, env={})
    if out.returncode != 0:
        raise OSError(f"{python} did not run: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    found = json.loads(out.stdout)
    found["executable"] = executable
    return found


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def command(limits: SandboxLimits) -> list[str]:
    """The bwrap command line that runs BOOTSTRAP under `limits` (the snippet comes on stdin)."""
    paths = layout(limits.python or base_python())
    argv = [
        shutil.which(limits.bwrap) or limits.bwrap,
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--clearenv",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
        "--proc", "/proc", "--dev", "/dev",
    ]
    bound: list[str] = []
    for lib in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):  # shared libraries (symlinks on merged-/usr systems)
        if os.path.islink(lib):
            argv += ["--symlink", os.readlink(lib), lib]
        elif os.path.isdir(lib):
            argv += ["--ro-bind", lib, lib]
            bound.append(lib)
    for path in [paths["executable"], paths["libpython"], *paths["stdlib"]]:
        if path and os.path.exists(path) and not _under(path, bound):
            argv += ["--ro-bind", path, path]
            bound.append(path)
    hidden = set(paths["site"]) | set(glob.glob("/usr/lib*/python3*/*-packages"))
    for path in sorted(hidden):  # an empty read-only directory over each: no third-party package imports
        if os.path.isdir(path) and _under(os.path.realpath(path), bound):
            path = os.path.realpath(path)
            argv += ["--tmpfs", path, "--remount-ro", path]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/", "--"]
    rlimits = {
        "RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_CPU": limits.cpu_s, "RLIMIT_FSIZE": FILE_BYTES,
        "RLIMIT_NOFILE": OPEN_FILES, "RLIMIT_CORE": 0, "RLIMIT_NPROC": limits.max_processes,
    }
    argv += [paths["executable"], "-I", "-S", "-X", "utf8", "-c", BOOTSTRAP]
    for name, value in rlimits.items():
        argv += [name, str(value)]
    return argv


def _host_user() -> dict:
    """subprocess arguments that start bwrap as the unprivileged sandbox uid when the server is root
    (set in the child by subprocess itself, no preexec_fn)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _why(stderr: str, python: str) -> str:
    """A one-line reason from bwrap's complaint."""
    last = (stderr.strip().splitlines() or ["no output"])[-1][:200]
    if "Can't find source path" in last and "Permission denied" in last:
        return (f"uid {SANDBOX_UID}, which runs the sandbox when the server is root, cannot read the sandbox's Python "
                f"({python}): {last}; set background.sandbox.python to an interpreter it can read, such as /usr/bin/python3")
    if "Unknown option" in last or "unrecognized option" in last:
        return f"this bwrap is too old ({last}); {HINT}"
    return f"the sandbox did not start here ({last}); {HINT}"


@functools.lru_cache(maxsize=8)
def available(python: str | None = None, bwrap: str = "bwrap") -> str | None:
    """Why the sandbox cannot isolate a snippet on this machine (None: it can). Runs a probe
    snippet through the real sandbox and checks its uid, network and filesystem."""
    if shutil.which(bwrap) is None:
        return f"bubblewrap ({bwrap}) is not installed: {HINT}"
    python = python or base_python()
    try:
        argv = command(SandboxLimits(python=python, bwrap=bwrap))
        probe = subprocess.run(argv, input=_PROBE.encode(), capture_output=True, timeout=60, **_host_user())
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return f"the sandbox could not be started with {python}: {exc}; {HINT}"
    if probe.returncode != 0:
        return _why(probe.stderr.decode("utf-8", "replace"), python)
    if probe.stdout.decode().strip() != _PROBE_OK:
        return f"the sandbox's probe saw more than it should ({probe.stdout.decode()[:200].strip()}); {HINT}"
    return None


class SandboxUnavailable(RuntimeError):
    """The sandbox was asked for where it cannot isolate (the message says why and what to do)."""


class Sandbox:
    """Runs snippets under `limits`, at most `limits.max_running` at once (see the module docstring)."""

    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_running)
        self.counts = {"runs": 0, "refused": 0, "stopped": 0}

    def check(self) -> None:
        """Raise SandboxUnavailable unless the sandbox isolates here."""
        reason = available(self.limits.python, self.limits.bwrap)
        if reason:
            raise SandboxUnavailable(f"background.sandbox.enabled is set, but {reason}")

    async def run(self, code: str) -> dict:
        source = code.encode("utf-8", "surrogatepass")
        if len(source) > MAX_CODE_BYTES:
            raise ToolError(f"python: programs are limited to {MAX_CODE_BYTES} bytes")
        if self.slots.locked():  # refused, not queued: acquiring below never waits
            self.counts["refused"] += 1
            raise ToolError(f"python: {self.limits.max_running} programs are already running; try again shortly")
        async with self.slots:
            self.counts["runs"] += 1
            return await self._run(source)

    async def _run(self, source: bytes) -> dict:
        limits = self.limits
        try:
            argv = command(limits)
            # A mark on this run's command line (bwrap's, and its PID-namespace init's, a fork of
            # it): what finds the init to kill when it has outlived bwrap in a session of its own.
            mark = f"interplay-sandbox-{secrets.token_hex(8)}"
            argv[argv.index("--"):argv.index("--")] = ["--setenv", "INTERPLAY_SANDBOX_RUN", mark]
        except (OSError, ValueError) as exc:
            raise ToolError(f"python: the sandbox could not start: {exc}") from None
        spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={}, start_new_session=True, **_host_user(),
        ))
        try:
            proc = await asyncio.shield(spawn)
        except OSError as exc:
            raise ToolError(f"python: the sandbox could not start: {exc}") from None
        except asyncio.CancelledError:  # cancelled while it starts: it may be running already
            await asyncio.shield(_stop_started(spawn, mark))
            raise
        stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
        assert stdin is not None and stdout is not None and stderr is not None  # all three were asked for as pipes
        stopped = []  # why we stopped it, if we did

        def stop(why: str) -> None:
            if not stopped:
                stopped.append(why)
                self.counts["stopped"] += 1
            _kill(proc, mark)

        async def feed() -> None:
            try:
                stdin.write(source)
                await stdin.drain()
                stdin.close()
            except (BrokenPipeError, ConnectionResetError):  # it ended before reading it all
                pass

        async def read(stream: asyncio.StreamReader, name: str) -> tuple[bytes, bool]:
            chunks, size = [], 0
            while chunk := await stream.read(64 * 1024):
                if size + len(chunk) > limits.output_bytes:
                    chunks.append(chunk[: limits.output_bytes - size])
                    stop(name)
                    return b"".join(chunks), True
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks), False

        async def communicate() -> tuple:
            (out, out_cut), (err, err_cut), _ = await asyncio.gather(read(stdout, "stdout"), read(stderr, "stderr"), feed())
            return out, out_cut, err, err_cut, await proc.wait()  # it may close its output and go on

        try:
            out, out_cut, err, err_cut, status = await asyncio.wait_for(communicate(), limits.timeout_s)
        except asyncio.TimeoutError:
            stop("time")
            await _reap(proc, mark, killed=True)
            raise ToolError(f"python: exceeded the {limits.timeout_s:g} s time limit") from None
        except BaseException:  # cancelled: the sandbox goes too
            stop("cancelled")
            await asyncio.shield(_reap(proc, mark, killed=True))
            raise
        await _reap(proc, mark, killed=bool(stopped))
        text = out.decode("utf-8", "replace")
        error = err.decode("utf-8", "replace").strip()
        if out_cut:
            return {"stdout": text, "exit": None, "truncated": True}
        if err_cut:
            raise ToolError(f"python: its error output passed {limits.output_bytes} bytes; it was stopped")
        if status == 0:
            return {"stdout": text, "exit": 0}
        last = error.splitlines()[-1][:300] if error else f"exit status {status}"
        if last.startswith("bwrap:"):
            raise ToolError(f"python: the sandbox could not start: {last}")
        if "MemoryError" in error:
            raise ToolError(f"python: exceeded the memory limit ({limits.memory_mb} MiB)")
        if status in (128 + signal.SIGKILL, 128 + signal.SIGXCPU):  # the kernel's RLIMIT_CPU signals
            raise ToolError(f"python: exceeded the CPU time limit ({limits.cpu_s} s)")
        raise ToolError(f"python: {last}")


async def _reap(proc, mark: str, killed: bool = False) -> None:
    """Wait for the sandbox to end and read its pipes to their end, discarding, so that nothing of
    it stays open (it has ended, or was killed: this is quick).

    bwrap's init in the sandbox's PID namespace can outlive a bwrap killed while it was still
    setting up (its parent-death signal is set after the fork, and it has its own session, out of
    reach of bwrap's group), holding the pipes and the snippet. So where it was `killed`, every
    process carrying this run's `mark` is killed again every half second until all has ended."""

    async def drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(64 * 1024):
            pass

    proc.stdin.close()
    ended = asyncio.ensure_future(asyncio.gather(proc.wait(), drain(proc.stdout), drain(proc.stderr)))
    while not ended.done():
        await asyncio.wait({ended}, timeout=0.5)
        if killed and not ended.done():
            _kill(proc, mark)
    await ended


async def _stop_started(spawn: asyncio.Future, mark: str) -> None:
    """Kill and reap a sandbox whose start was being awaited when its run was cancelled."""
    try:
        proc = await spawn
    except OSError:
        return
    _kill(proc, mark)
    await _reap(proc, mark, killed=True)


def _kill(proc, mark: str) -> None:
    """Kill bwrap's process group and every process on the host carrying this run's `mark` (its
    PID namespace's init among them: the namespace, the snippet included, goes with it)."""
    if proc.returncode is None:  # once reaped, its group id may be another's
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    needle = mark.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> dict:
    """Run one snippet in a sandbox of its own (see `Sandbox.run`)."""
    return await Sandbox(limits).run(code)
