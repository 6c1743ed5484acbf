"""The snapshot codec: an exported engine state round-trips losslessly, without pickle, and what it cannot keep is refused."""

import json

import numpy as np
import pytest

from actors.log.snapshot_codec import decode_state, encode_state
from protocols import ProtocolError

from .test_log_failover import assert_same, engine_state


def test_a_state_round_trips_as_json_and_arrays():
    state = engine_state()
    meta, arrays = encode_state(state)
    json.loads(meta)  # the non-array part is plain JSON
    assert all(isinstance(a, np.ndarray) and not a.dtype.hasobject for a in arrays.values())
    state["rows"]["kv"][:] = 0  # the encoding holds copies, not the caller's arrays
    assert_same(decode_state(meta, arrays), engine_state())


@pytest.mark.parametrize("bad", [[1], {1: "a"}, {"o": np.array([object()])}, {"f": lambda: 0}, {"s": {1, 2}}])
def test_what_a_snapshot_cannot_keep_is_refused(bad):
    with pytest.raises(ProtocolError) as exc:
        encode_state(bad)
    assert exc.value.code == "invalid_state"
