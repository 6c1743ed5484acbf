"""Typed tools the background pool may call, and the registry that holds them.

A `Tool` is a name, a description, a JSON schema for its arguments (an object schema) and an
async function called with those arguments as keywords. `ToolRegistry.call(name, arguments)`
checks the arguments against the schema, runs the function under a time limit and returns its
result (JSON-serialisable); whatever goes wrong (unknown tool, bad arguments, the function
raising, the time limit) is a `ToolError` with a one-line message, never anything else.

Built in (`default_tools()`):
- `clock`: the current time (UTC and local, ISO 8601, Unix seconds);
- `timer`: waits the given seconds (at most `MAX_TIMER_S`) and says so;
- `calculator`: arithmetic over numbers, + - * / // % **, parentheses and a few math functions,
  evaluated from the expression's syntax tree (nothing is `eval`ed; huge powers are refused);
- `python`: runs a snippet in a separate interpreter (`python -I`, empty environment, its own
  temporary directory) under `resource.setrlimit` limits on address space, CPU time, file size and
  open files, and a wall-clock limit; what it prints is the result. Exceeding a limit is a ToolError.

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
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

MAX_TIMER_S = 300.0
MAX_OUTPUT_CHARS = 8000


class ToolError(Exception):
    """A tool could not give a result; the message says why in one line."""


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
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or abs(left) > 1e100):
                raise ToolError("calculator: power too large")
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int) and abs(left) > 1e300 / max(abs(right), 1):
                raise ToolError("calculator: product too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            args = [ev(a) for a in node.args]
            if node.func.id == "factorial" and (not args or args[0] > 500):
                raise ToolError("calculator: factorial argument too large")
            return _FUNCTIONS[node.func.id](*args)
        raise ToolError(f"calculator: unsupported syntax {type(node).__name__}")

    try:
        value = ev(tree)
    except ToolError:
        raise
    except (ArithmeticError, ValueError, TypeError) as exc:
        raise ToolError(f"calculator: {exc}") from None
    if isinstance(value, int) and value.bit_length() > 3000:
        raise ToolError("calculator: result too large")
    return value


async def calculator(expression: str) -> float | int:
    return calculate(expression)


# --- sandboxed python ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock
    cpu_s: int = 4  # RLIMIT_CPU
    memory_mb: int = 256  # RLIMIT_AS
    max_output_chars: int = MAX_OUTPUT_CHARS


def _limit(limits: SandboxLimits) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        os.setsid()
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


async def run_python(code: str, limits: SandboxLimits = SandboxLimits()) -> dict:
    """Run `code` in a limited child interpreter; {"stdout", "exit"} or ToolError."""
    with tempfile.TemporaryDirectory(prefix="interplay-sandbox-") as cwd:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", code,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=cwd, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, preexec_fn=_limit(limits),
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), limits.timeout_s)
        except asyncio.TimeoutError:
            _kill(proc)
            await proc.wait()
            raise ToolError(f"python: exceeded the {limits.timeout_s:g} s time limit") from None
        except BaseException:  # cancelled: the child goes too
            _kill(proc)
            raise
    out = stdout.decode("utf-8", "replace")[: limits.max_output_chars]
    err = stderr.decode("utf-8", "replace")
    code_ = proc.returncode
    if code_ in (-signal.SIGXCPU, -signal.SIGKILL) or "MemoryError" in err:
        what = "memory" if "MemoryError" in err else "CPU time"
        raise ToolError(f"python: exceeded the {what} limit")
    if code_ != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit status {code_}"
        raise ToolError(f"python: {last[:300]}")
    return {"stdout": out, "exit": code_}


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- the built-in set ----------------------------------------------------------------------------


def default_tools(limits: SandboxLimits = SandboxLimits(), timeout_s: float = 10.0) -> ToolRegistry:
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

    async def python(code: str) -> dict:
        return await run_python(code, limits)

    registry.register(Tool(
        "python", "Run a short Python program in a sandbox; what it prints is the result.",
        {"type": "object", "properties": {"code": {"type": "string", "minLength": 1, "maxLength": 4000}}, "required": ["code"], "additionalProperties": False},
        python, timeout_s=limits.timeout_s + 5,
    ))
    return registry
