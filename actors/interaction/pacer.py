"""`TickPacer`: when a loop over ticks takes its next tick.

Tick k is taken as soon as `ready(k)` holds (checked again whenever `poke` is called), and at the
latest at `deadline(k)`. A loop that reaches tick k more than `slack_s` after its deadline is
behind: it is handed the newest tick that is due (`due()`) instead, and the ticks between are the
caller's to skip. Used by the interaction actor's tick loop and by each ingress gatherer.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class TickPacer:
    def __init__(self, deadline: Callable[[int], float], due: Callable[[], int], now: Callable[[], float], slack_s: float = 0.0):
        self.deadline, self.due, self.now, self.slack_s = deadline, due, now, slack_s
        self._news = asyncio.Event()

    def poke(self) -> None:
        """Something `ready` reads has changed: check it again."""
        self._news.set()

    async def next(self, k: int, ready: Callable[[int], bool]) -> int:
        """Wait for tick `k` (until `ready(k)` or its deadline); -> `k`, or the newest due tick
        when the loop is behind."""
        while True:
            self._news.clear()
            delay = self.deadline(k) - self.now()
            if delay <= 0 or ready(k):
                break
            try:
                await asyncio.wait_for(self._news.wait(), delay)
            except asyncio.TimeoutError:
                pass
        if self.now() - self.deadline(k) > self.slack_s:
            k = max(k, self.due())
        return k
