"""A session's engine state as a pickle-free snapshot: (JSON bytes, named numpy arrays).

`encode_state` turns an `Engine.export_session` dict into that pair losslessly, refusing anything
that is not dicts, lists, tuples, strings, numbers, bytes and numpy arrays
(ProtocolError("invalid_state")); `decode_state` is its inverse. The log writes the pair as one
.npz (`LogStore.write_snapshot`), so reading a snapshot back never unpickles anything.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from protocols.chunks import ProtocolError

_TAGS = ("__array__", "__bytes__", "__tuple__", "__dict__")


def encode_state(state: Any) -> tuple[bytes, dict[str, np.ndarray]]:
    """An `Engine.export_session` dict as (JSON, arrays), losslessly and without pickle.

    Arrays and numpy scalars become members "a0", "a1", ... (copies, referenced from the JSON),
    bytes base64, tuples stay tuples; dicts need string keys. Anything else (objects, object
    arrays) is refused: ProtocolError("invalid_state").
    """
    if not isinstance(state, dict):
        raise ProtocolError(f"state must be a dict (an exported session), got {type(state).__name__}", "invalid_state", "state")
    arrays: dict[str, np.ndarray] = {}

    def enc(v: Any, where: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.ndarray, np.generic)):
            a = np.asarray(v)
            if a.dtype.hasobject:
                raise ProtocolError(f"state{where}: arrays of Python objects are not kept", "invalid_state", "state")
            key = f"a{len(arrays)}"
            arrays[key] = a.copy()  # the caller's arrays may change (or pin a Ray object) after the call
            return {"__array__" if isinstance(v, np.ndarray) else "__scalar__": key}
        if isinstance(v, (bytes, bytearray, memoryview)):
            return {"__bytes__": base64.b64encode(bytes(v)).decode()}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str)]
            if bad:
                raise ProtocolError(f"state{where}: keys must be strings, got {bad[0]!r}", "invalid_state", "state")
            out = {k: enc(x, f"{where}[{k!r}]") for k, x in v.items()}
            return {"__dict__": out} if any(k in _TAGS for k in out) else out
        raise ProtocolError(f"state{where} is a {type(v).__name__}: a snapshot keeps dicts, lists, tuples, strings, numbers, bytes and numpy arrays", "invalid_state", "state")

    meta = json.dumps(enc(state, ""), ensure_ascii=False).encode()
    return meta, arrays


def decode_state(meta: bytes, arrays) -> dict:
    """`encode_state`'s inverse; `arrays` maps member names to arrays (an open npz will do)."""

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            (tag, x), = v.items()
            if tag == "__array__":
                return np.array(arrays[x])
            if tag == "__scalar__":
                return np.asarray(arrays[x])[()]
            if tag == "__bytes__":
                return base64.b64decode(x)
            if tag == "__tuple__":
                return tuple(dec(y) for y in x)
            if tag == "__dict__":
                return {k: dec(y) for k, y in x.items()}
        return {k: dec(x) for k, x in v.items()}

    return dec(json.loads(meta))
