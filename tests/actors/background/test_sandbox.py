"""actors.background.sandbox: a snippet stopped at any moment of its start-up leaves nothing behind.

Cancelling a run while bwrap is still setting the sandbox up once left the sandbox's PID-namespace
init alive (it missed the SIGKILL sent to its group), holding the pipes open, so the cancelled run
waited on them for ever. Here runs are cancelled after 0 to 40 turns of the event loop, which
lands cancels across bwrap's whole start-up; each must end and leave no process.
"""

from __future__ import annotations

import asyncio
import os

from actors.background.sandbox import Sandbox
from tests.sandboxes import limits
from tests.waits import TIMEOUT_S, wait_for

MEMORY_MB = 253  # an address-space limit no other test uses: it marks this file's sandboxes
SIGNATURE = f"RLIMIT_AS\0{MEMORY_MB << 20}\0".encode()


def sandbox_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if SIGNATURE in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_a_run_cancelled_at_any_point_of_its_start_ends_and_leaves_no_process():
    box = Sandbox(limits(memory_mb=MEMORY_MB, timeout_s=30, max_running=1))

    async def cancel_after(turns: int) -> None:
        run = asyncio.create_task(box.run("import time; time.sleep(60)"))
        for _ in range(turns):
            await asyncio.sleep(0)
        run.cancel()
        # a hang here is the bug: the run must end once cancelled, however early
        await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), TIMEOUT_S)

    async def main() -> None:
        for turns in range(0, 41, 2):
            await cancel_after(turns)

    asyncio.run(main())
    wait_for(lambda: not sandbox_pids(), message=lambda: f"sandbox processes still alive: {sandbox_pids()}")
    assert box.counts["runs"] >= 1 and not sandbox_pids()  # runs did start, and none outlived its cancel
