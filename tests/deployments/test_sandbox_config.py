"""`background.sandbox`: the python tool is off by default, on only where the sandbox isolates,
and start-up is refused (with the reason and the fix) where it is asked for but cannot isolate."""

import asyncio

import pytest
from pydantic import ValidationError

from deployments.plan import StartupError, background_options
from deployments.config import AppConfig
from tests.sandboxes import sandbox_python


def config(**sandbox) -> AppConfig:
    return AppConfig.model_validate({"background": {"speech": {"mode": "none"}, "sandbox": sandbox}})


def test_the_python_tool_is_off_by_default():
    assert AppConfig().background.sandbox.enabled is False
    assert "python" not in background_options(config(), log=None)["tools"].names()
    with pytest.raises(ValidationError):
        config(enable=True)  # a typo is refused, never silently off
    with pytest.raises(ValidationError):
        config(max_running=0)


def test_enabled_where_it_cannot_isolate_start_up_is_refused_with_the_reason():
    with pytest.raises(StartupError, match="background.sandbox.enabled is set, but .*/nonexistent/python"):
        background_options(config(enabled=True, python="/nonexistent/python"), log=None)


def test_enabled_where_it_isolates_the_registry_has_the_python_tool_with_the_configured_limits():
    python, why = sandbox_python()
    if why:
        pytest.skip(f"the python sandbox cannot isolate here: {why}")
    tools = background_options(config(enabled=True, python=python, timeout_s=7, output_kb=2), log=None)["tools"]
    assert "python" in tools.names() and tools.get("python").timeout_s == 12
    out = asyncio.run(tools.call("python", {"code": "print('x' * 5000)"}))
    assert out == {"stdout": "x" * 2048, "exit": None, "truncated": True}
