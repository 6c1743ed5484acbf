"""The error a tool call ends in (`ToolError`), raised by the tool registry (`actors.background.tools`)
and the python tool's sandbox (`actors.background.sandbox`) alike, so neither imports the other's module."""


class ToolError(Exception):
    """A tool could not give a result; the message says why in one line."""
