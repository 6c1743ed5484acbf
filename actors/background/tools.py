"""Typed tools the background pool may call, and the registry that holds them.

A `Tool` is a name, a description, a JSON schema for its arguments (an object schema) and an
async function called with those arguments as keywords. `ToolRegistry.call(name, arguments)`
checks the arguments against the schema, runs the function under a time limit and returns its
result (JSON-serialisable); whatever goes wrong (unknown tool, bad arguments, the function
raising, the time limit) is a `ToolError` with a one-line message, never anything else. No
built-in tool runs on the event loop for longer than a moment, so the time limit can stop it.

Built in (`default_tools()`):
- `clock`: the current time (UTC and local, ISO 8601, Unix seconds);
- `timer`: waits the given seconds (at most `MAX_TIMER_S`) and says so;
- `calculator`: arithmetic over numbers, + - * / // % **, parentheses and a few math functions,
  evaluated from the expression's syntax tree (nothing is `eval`ed) in a worker thread. Every
  operation whose result could pass `MAX_INT_BITS` (a product, a power, a factorial, `round` to
  far too many digits) is refused before it is computed, so every accepted expression is quick;
- `python`, only with `default_tools(sandbox=SandboxLimits(...))` (config
  `background.sandbox.enabled`, off by default): runs a snippet in the bubblewrap sandbox of
  actors/background/sandbox.py and returns what it printed. The isolation contract, in short: the snippet
  runs as uid 65534 in its own user, PID, network, IPC, UTS and cgroup namespaces with no
  capabilities; it reads only the interpreter, its standard library (no site-packages) and the
  system's shared libraries, all read-only, and writes nowhere (no writable filesystem at all);
  it sees only its own processes in /proc, a minimal read-only /dev, no environment variables,
  and a network with only its own loopback (nothing outside the sandbox is reachable, the host's
  loopback included). Limits, set before the snippet runs so it cannot raise them: address space,
  CPU time, processes (a fork bomb stops at `max_processes`), open files, file size, no cores,
  the wall clock, and stdout/stderr each read up to `output_bytes` before it is stopped. Every
  process it started is gone when the call returns, times out or is cancelled. At most
  `max_running` snippets run at once per registry; another call is refused with a ToolError.
  Where bwrap or user namespaces are missing, asking for it raises `SandboxUnavailable`.

Users add their own with `registry.register(Tool(...))` or the `@registry.tool(...)` decorator
(e.g. a search backend), or name `module:attribute` paths in the config (`load_tools`).
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import importlib
import json
import math
import operator
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from actors.background.errors import ToolError

if TYPE_CHECKING:
    from actors.background.sandbox import SandboxLimits

MAX_TIMER_S = 300.0


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Awaitable[Any]]
    timeout_s: float | None = None  # None: the registry's

    def spec(self) -> dict:
        """The OpenAI function-tool description of this tool."""
        return {"type": "function", "name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass
class ToolRegistry:
    timeout_s: float = 10.0
    tools: dict[str, Tool] = field(default_factory=dict)

    def register(self, tool: Tool) -> Tool:
        if not tool.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"tool names are letters, digits, - and _: {tool.name!r}")
        if tool.parameters.get("type") != "object":
            raise ValueError(f"tool {tool.name!r}: parameters must be an object schema")
        self.tools[tool.name] = tool
        return tool

    def tool(self, name: str, parameters: dict, description: str = "", timeout_s: float | None = None):
        """Decorator: register an async function as a tool."""

        def wrap(fn):
            self.register(Tool(name, description or (fn.__doc__ or "").strip(), parameters, fn, timeout_s))
            return fn

        return wrap

    def get(self, name: str) -> Tool | None:
        return self.tools.get(name)

    def names(self) -> list[str]:
        return list(self.tools)

    def specs(self, names: list[str] | None = None) -> list[dict]:
        return [self.tools[n].spec() for n in (names if names is not None else self.tools) if n in self.tools]

    async def call(self, name: str, arguments: dict) -> Any:
        tool = self.tools.get(name)
        if tool is None:
            raise ToolError(f"no tool named {name!r}")
        check_arguments(tool, arguments)
        limit = tool.timeout_s or self.timeout_s
        try:
            result = await asyncio.wait_for(tool.fn(**arguments), limit)
        except asyncio.TimeoutError:
            raise ToolError(f"{name} took longer than {limit:g} s") from None
        except ToolError:
            raise
        except Exception as exc:  # a user's tool may raise anything: it becomes an error result
            raise ToolError(f"{name} failed: {type(exc).__name__}: {exc}") from None
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            result = repr(result)
        return result


def check_arguments(tool: Tool, arguments: Any) -> None:
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name}: arguments must be a JSON object")
    import jsonschema

    try:
        jsonschema.validate(arguments, tool.parameters)
    except jsonschema.ValidationError as exc:
        raise ToolError(f"{tool.name}: bad arguments: {exc.message}") from None


def load_tools(registry: ToolRegistry, paths: list[str]) -> ToolRegistry:
    """Register tools named `module:attribute`: a Tool, a list of Tools, or a function called with
    the registry (which registers what it likes)."""
    for path in paths:
        module, _, attr = path.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, Tool):
            registry.register(obj)
        elif isinstance(obj, (list, tuple)):
            for tool in obj:
                registry.register(tool)
        elif callable(obj):
            obj(registry)
        else:
            raise ValueError(f"{path} is not a Tool, a list of Tools or a function")
    return registry


# --- clock and timer -----------------------------------------------------------------------------


async def clock() -> dict:
    now = time.time()
    return {
        "utc": dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"),
        "local": dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "unix": round(now, 3),
    }


async def timer(seconds: float, label: str = "") -> str:
    await asyncio.sleep(seconds)
    return f"timer {label + ' ' if label else ''}done after {seconds:g} s"


# --- calculator ----------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {name: getattr(math, name) for name in ("sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "exp", "log", "log10", "log2", "floor", "ceil", "factorial")}
_FUNCTIONS.update(abs=abs, round=round, min=min, max=max)
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_EXPRESSION = 200
# No integer on the way may pass this many bits: each operation on such numbers takes
# microseconds, so an accepted expression (at most MAX_EXPRESSION characters) is always quick.
MAX_INT_BITS = 4096
MAX_FACTORIAL = 500  # 500! has 3,767 bits
MAX_ROUND_DIGITS = 1000  # round(x, -1000) computes 10 ** 1000, 3,322 bits


def _too_large(what: str) -> ToolError:
    return ToolError(f"calculator: {what} too large")


def _check_before(op: type, left, right) -> None:
    """Refuse an operation whose integer result would pass MAX_INT_BITS, before computing it."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # a float result: it overflows (an error) or not, at once
    if op is ast.Mult and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:  # the product has that many bits, or one fewer
        raise _too_large("product")
    if op is ast.Pow and right > 0 and abs(left) > 1 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
        raise _too_large("power")


def _check_call(name: str, args: list) -> None:
    if name == "factorial" and (len(args) != 1 or not isinstance(args[0], int) or args[0] > MAX_FACTORIAL):
        raise ToolError(f"calculator: factorial takes one integer up to {MAX_FACTORIAL}")
    if name == "round" and len(args) == 2 and (not isinstance(args[1], int) or abs(args[1]) > MAX_ROUND_DIGITS):
        raise ToolError(f"calculator: round takes a whole number of digits between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")


def _bounded(value):
    if isinstance(value, complex):
        raise ToolError("calculator: the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _too_large("result")
    return value


def calculate(expression: str) -> float | int:
    """Evaluate an arithmetic expression from its syntax tree; ToolError for anything else."""
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"calculator: expressions are limited to {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise ToolError(f"calculator: not an expression: {expression!r}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return _bounded(node.value)
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            _check_before(type(node.op), left, right)
            return _bounded(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            args = [ev(a) for a in node.args]
            _check_call(node.func.id, args)
            return _bounded(_FUNCTIONS[node.func.id](*args))
        raise ToolError(f"calculator: unsupported syntax {type(node).__name__}")

    try:
        return ev(tree)
    except ToolError:
        raise
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ToolError(f"calculator: {exc}") from None
    except RecursionError:  # nesting deeper than the parser's own limit
        raise ToolError("calculator: expression nested too deeply") from None


async def calculator(expression: str) -> float | int:
    # In a worker thread, so the shared event loop never waits on it (and the registry's time
    # limit holds); the checks above keep every accepted expression quick, as a thread cannot be killed.
    return await asyncio.to_thread(calculate, expression)


# --- the built-in set ----------------------------------------------------------------------------


def default_tools(sandbox: SandboxLimits | None = None, timeout_s: float = 10.0) -> ToolRegistry:
    """The built-in tools. `python` only with `sandbox` (its limits, actors/background/sandbox.py), once a probe
    run showed that the sandbox isolates here; else `SandboxUnavailable` says why."""
    registry = ToolRegistry(timeout_s=timeout_s)
    registry.register(Tool("clock", "The current date and time.", {"type": "object", "properties": {}, "additionalProperties": False}, clock))
    registry.register(Tool(
        "timer", "Wait the given number of seconds, then report.",
        {"type": "object", "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": MAX_TIMER_S}, "label": {"type": "string", "maxLength": 80}},
         "required": ["seconds"], "additionalProperties": False},
        timer, timeout_s=MAX_TIMER_S + 5,
    ))
    registry.register(Tool(
        "calculator", "Evaluate an arithmetic expression (+ - * / // % **, parentheses, sqrt, sin, log, ...).",
        {"type": "object", "properties": {"expression": {"type": "string", "minLength": 1, "maxLength": MAX_EXPRESSION}}, "required": ["expression"], "additionalProperties": False},
        calculator,
    ))
    if sandbox is not None:
        from actors.background.sandbox import Sandbox

        box = Sandbox(sandbox)
        box.check()  # never run unisolated

        async def python(code: str) -> dict:
            return await box.run(code)

        registry.register(Tool(
            "python", "Run a short Python program (standard library only, no files, no network) in a sandbox; what it prints is the result.",
            {"type": "object", "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 4000}}, "required": ["code"], "additionalProperties": False},
            python, timeout_s=sandbox.timeout_s + 5,
        ))
    return registry
