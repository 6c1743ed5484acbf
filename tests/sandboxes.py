"""The python tool's sandbox in tests: limits naming an interpreter the sandbox can run here, or a skip.

The server's own interpreter comes first. When the tests run as root, the sandbox runs as uid
65534, which cannot read an interpreter under /root (pyenv's): then the system's /usr/bin/python3,
as `background.sandbox.python` would name it. Where neither isolates, the test is skipped with
`actors.background.sandbox.available()`'s reason (no bwrap, no user namespaces).
"""

from __future__ import annotations

import functools

import pytest

from actors.background.sandbox import SandboxLimits, available


@functools.lru_cache(maxsize=1)
def sandbox_python() -> tuple[str | None, str | None]:
    """(interpreter, None) where the sandbox works, else (None, why not)."""
    first = available(None)
    if first is None:
        return None, None
    if available("/usr/bin/python3") is None:
        return "/usr/bin/python3", None
    return None, first


def limits(**kw) -> SandboxLimits:
    """SandboxLimits(**kw) with a working interpreter; skips the test where isolation cannot be had."""
    python, why = sandbox_python()
    if why:
        pytest.skip(f"the python sandbox cannot isolate here: {why}")
    return SandboxLimits(python=python, **kw)
