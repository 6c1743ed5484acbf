"""The tool registry, the built-in tools, the calculator's bounds and the Python sandbox's limits."""

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.background.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, available
from actors.background.tools import MAX_INT_BITS, Tool, ToolError, ToolRegistry, calculate, default_tools, load_tools
from tests.sandboxes import limits as sandbox_limits
from tests.waits import until


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


# Each would take minutes, memory without end or escape the arithmetic if it were computed.
HOSTILE = [
    "round(1, -10**300)", "round(1, -10**3000000)", "round(2.5, 10**400)", "round(1, 1001)",
    "9 ** 9 ** 9", "2 ** 10 ** 100", "10 ** 5000", "(10**1000) * (10**1000)", "2**4000 * 2**4000",
    "factorial(10**6)", "factorial(501)", "factorial(20.5)", "factorial(200)*factorial(200)*factorial(200)*factorial(200)",
    "max(2**4000, 1) * 2**100", "-(2**4096 + 2**4096)", "(2**4096 - 1) * 2 + 2",
    "1 << 100000", "1 >> 1", "pow(2, 10**9, 7)", "2 & 3", "~1",
    "[x for x in range(10**9)]", "{x: 1 for x in ()}", "(x for x in ())", "(1).__class__", "().__class__.__base__.__subclasses__()",
    "abs.__self__", "pi.real", "max[0]", "(1, 2)[0]", "lambda: 0", "sqrt(x=4)", "sin(*[1])", "1 if 1 else 2", "1 < 2",
    "'a' * 10**9", "(-8) ** 0.5", "2.0 ** 10**1000", "__import__('os')", "x := 1",
]


@pytest.mark.parametrize("expression", HOSTILE)
def test_the_calculator_refuses_huge_intermediates_and_anything_but_arithmetic(expression):
    with pytest.raises(ToolError, match="^calculator: "):
        run(default_tools().call("calculator", {"expression": expression}))


def test_the_calculator_still_computes_large_but_bounded_numbers():
    assert calculate("round(10**1000, -1000)") == 10**1000
    assert calculate("2**4000 * 2**95") == 2**4095
    assert calculate("factorial(500) // factorial(499)") == 500
    assert calculate("1 ** (10**1000)") == 1 and calculate("(-1) ** (10**1000 + 1)") == -1
    assert calculate("round(2.675, 2)") == 2.67 and calculate("10 ** -400") == 0.0


ARITHMETIC = st.recursive(
    st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr), st.sampled_from(["pi", "e"])),
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "^"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["sqrt", "log", "exp", "factorial", "round", "abs", "floor"]), inner).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(inner, inner).map(lambda t: f"round({t[0]}, {t[1]})"),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(ARITHMETIC)
def test_any_arithmetic_is_a_bounded_number_or_a_tool_error(expression):
    try:
        value = calculate(expression)
    except ToolError:
        return
    assert isinstance(value, (int, float)) and not isinstance(value, bool)
    assert not isinstance(value, int) or value.bit_length() <= MAX_INT_BITS


def test_the_python_tool_is_off_unless_a_sandbox_is_asked_for():
    assert set(default_tools().names()) == {"clock", "timer", "calculator"}


def test_asking_for_the_sandbox_where_it_cannot_isolate_is_refused_with_the_reason():
    with pytest.raises(SandboxUnavailable, match=r"background.sandbox.enabled is set, but bubblewrap \(/nonexistent/bwrap\) is not installed: install bubblewrap"):
        default_tools(SandboxLimits(bwrap="/nonexistent/bwrap"))
    assert "user namespaces" in available(bwrap="/nonexistent/bwrap")
    with pytest.raises(SandboxUnavailable, match="/nonexistent/python"):
        default_tools(SandboxLimits(python="/nonexistent/python"))


def test_registry_checks_arguments_and_turns_failures_into_tool_errors():
    registry = default_tools()
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
    load_tools(registry, ["tests.actors.background.test_tools:EXTRA"])
    assert run(registry.call("echo", {"text": "hi"})) == "hi"


async def _echo(text):
    return text


EXTRA = Tool("echo", "echoes", {"type": "object", "properties": {"text": {"type": "string"}}}, _echo)


def test_sandbox_runs_python_and_enforces_its_limits():
    registry = default_tools(sandbox_limits(timeout_s=3.0, cpu_s=2, memory_mb=200))
    assert run(registry.call("python", {"code": "print(sum(range(10)))"})) == {"stdout": "45\n", "exit": 0}
    with pytest.raises(ToolError, match="memory"):
        run(registry.call("python", {"code": "x = bytearray(1 << 30)"}))
    with pytest.raises(ToolError, match="limit"):
        run(registry.call("python", {"code": "while True: pass"}))
    with pytest.raises(ToolError, match="ZeroDivisionError"):
        run(registry.call("python", {"code": "1/0"}))
    with pytest.raises(ToolError, match="SyntaxError"):
        run(registry.call("python", {"code": "def f(:"}))
    # No environment: the child sees nothing of the server's secrets.
    out = run(registry.call("python", {"code": "import os; print(sorted(os.environ))"}))["stdout"]
    assert "INTERPLAY_API_KEYS" not in out and "RAY_ADDRESS" not in out and "PATH" not in out


def test_sandboxes_past_the_cap_are_refused_until_one_ends():
    box = Sandbox(sandbox_limits(max_running=1, timeout_s=60))

    async def main():
        first = asyncio.create_task(box.run("import time; time.sleep(60)"))
        await until(lambda: box.counts["runs"] == 1)
        with pytest.raises(ToolError, match="1 programs are already running"):
            await box.run("print(1)")
        first.cancel()  # the running one ends (cancelled, its sandbox killed): the slot is free again
        with pytest.raises(asyncio.CancelledError):
            await first
        return await box.run("print(2)")

    assert run(main()) == {"stdout": "2\n", "exit": 0}
    assert box.counts["runs"] == 2 and box.counts["refused"] == 1
