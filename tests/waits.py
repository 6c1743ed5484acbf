"""Waiting in tests for something to happen: poll a condition until it holds, or fail.

`wait_for` (blocking) and `until` (async) return the condition's first true value. Their
`timeout` is only the point at which the test gives up and fails (the thing never happened), not
a budget the code is meant to meet: CI machines are noisy, so it stays far above any normal time.
A condition may be a plain function or, for `until`, a coroutine function (`ingress.stats`).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable

TIMEOUT_S = 60.0


def _failed(timeout: float, condition: Callable, message: Any) -> AssertionError:
    detail = message() if callable(message) else message
    return AssertionError(f"not met within {timeout:g} s: {detail if detail is not None else getattr(condition, '__name__', condition)}")


def wait_for(condition: Callable[[], Any], timeout: float = TIMEOUT_S, interval: float = 0.05, message: Any = None) -> Any:
    """Call `condition` every `interval` s until it returns something true; return that.
    `message` (a value, or a function called at failure) says what was seen instead."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _failed(timeout, condition, message)
        time.sleep(interval)


async def until(condition: Callable[[], Any], timeout: float = TIMEOUT_S, interval: float = 0.02, message: Any = None) -> Any:
    """`wait_for` inside an event loop: the loop runs between polls; `condition` may be async."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _failed(timeout, condition, message)
        await asyncio.sleep(interval)
