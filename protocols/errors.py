"""`ProtocolError`: input that breaks a contract, with a stable `code` (and the `param` at fault)
that maps straight to a Realtime error event or an HTTP status."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Input that breaks a contract. `code` is a stable machine-readable reason."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
