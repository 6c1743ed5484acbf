"""The tool registry, the built-in tools and the Python sandbox's limits."""

import asyncio

import pytest

from actors.tools import SandboxLimits, Tool, ToolError, ToolRegistry, calculate, default_tools, load_tools


def run(coro):
    return asyncio.run(coro)


def test_calculator_evaluates_arithmetic_and_refuses_code():
    assert calculate("(1 + 2) * 3 / 4 - 5 ** 2") == pytest.approx(-22.75)
    assert calculate("sqrt(16) + 2^3") == 12.0
    for bad in ("__import__('os').system('true')", "open('/etc/passwd')", "(1).__class__", "[x for x in ()]", "lambda: 1"):
        with pytest.raises(ToolError):
            calculate(bad)
    with pytest.raises(ToolError, match="too large"):
        calculate("9 ** 9 ** 9")
    with pytest.raises(ToolError, match="division by zero"):
        calculate("1 / 0")


def test_registry_checks_arguments_and_turns_failures_into_tool_errors():
    registry = default_tools()
    assert set(registry.names()) >= {"clock", "timer", "calculator", "python"}
    assert run(registry.call("calculator", {"expression": "6 * 7"})) == 42
    assert "utc" in run(registry.call("clock", {}))
    with pytest.raises(ToolError, match="bad arguments"):
        run(registry.call("calculator", {"expr": "1"}))
    with pytest.raises(ToolError, match="no tool"):
        run(registry.call("nope", {}))

    async def boom():
        raise RuntimeError("backend down")

    async def slow():
        await asyncio.sleep(5)

    registry.register(Tool("boom", "raises", {"type": "object"}, boom))
    registry.register(Tool("slow", "sleeps", {"type": "object"}, slow, timeout_s=0.1))
    with pytest.raises(ToolError, match="RuntimeError: backend down"):
        run(registry.call("boom", {}))
    with pytest.raises(ToolError, match="longer than"):
        run(registry.call("slow", {}))


def test_users_register_their_own_tools():
    registry = ToolRegistry()

    @registry.tool("search", {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]})
    async def search(q):
        """Search the user's notes."""
        return [f"note about {q}"]

    assert registry.specs() == [{"type": "function", "name": "search", "description": "Search the user's notes.",
                                 "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}]
    assert run(registry.call("search", {"q": "ray"})) == ["note about ray"]
    with pytest.raises(ValueError):
        registry.register(Tool("bad name!", "", {"type": "object"}, search))
    # By import path, as the config names them.
    load_tools(registry, ["tests.actors.test_tools:EXTRA"])
    assert run(registry.call("echo", {"text": "hi"})) == "hi"


async def _echo(text):
    return text


EXTRA = Tool("echo", "echoes", {"type": "object", "properties": {"text": {"type": "string"}}}, _echo)


def test_sandbox_runs_python_and_enforces_its_limits():
    limits = SandboxLimits(timeout_s=3.0, cpu_s=2, memory_mb=200)
    registry = default_tools(limits)
    assert run(registry.call("python", {"code": "print(sum(range(10)))"}))["stdout"].strip() == "45"
    with pytest.raises(ToolError, match="memory"):
        run(registry.call("python", {"code": "x = bytearray(1 << 30)"}))
    with pytest.raises(ToolError, match="limit"):
        run(registry.call("python", {"code": "while True: pass"}))
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        run(registry.call("python", {"code": "1/0"}))
    # No environment, no site: the child sees nothing of the server's secrets.
    out = run(registry.call("python", {"code": "import os; print(sorted(os.environ))"}))["stdout"]
    assert "INTERPLAY_API_KEYS" not in out and "RAY_ADDRESS" not in out
