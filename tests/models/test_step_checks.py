"""models.step_checks: what every engine family checks of a tick's chunks."""

import pytest

from models.step_checks import session_of, validate
from protocols import InputChunk, ProtocolError


def chunk(sid: str, seq: int = 0) -> InputChunk:
    return InputChunk.silent(sid, seq, 0.0, 160, missing=False)


def check(c):
    """An engine's own check: here, only the seq."""
    if c.seq < 0:
        raise ProtocolError("bad seq", "out_of_order", "seq")
    return c.session_id, c


def test_good_chunks_pass_and_every_live_session_without_one_is_stepped_as_missing():
    seen = []

    def missing(sid, like):
        seen.append((sid, like))
        return InputChunk.silent(sid, 9, 0.0, 160)

    a = chunk("a")
    accepted, errors = validate([a], check, ["a", "b"], missing)
    assert accepted["a"] is a and accepted["b"].missing and list(accepted) == ["a", "b"]
    assert errors["b"].code == "missing_session" and seen == [("b", None)]


def test_a_refused_chunk_is_an_error_under_its_session_and_its_session_is_stepped_as_missing():
    bad = chunk("a")
    object.__setattr__(bad, "seq", -1)
    dup = chunk("b")
    accepted, errors = validate([chunk("b"), dup, bad, "junk"], check, ["a", "b"], lambda sid, like: InputChunk.silent(sid, 0, 0.0, 160))
    assert errors["a"].code == "out_of_order" and accepted["a"].missing  # the first error is kept, not missing_session
    assert errors["b"].code == "duplicate_session" and not accepted["b"].missing
    assert errors[repr("junk")[:64]].code == "invalid_value"


def test_an_unhashable_session_id_is_left_to_the_engines_check_not_a_crash():
    odd = chunk("a")
    object.__setattr__(odd, "session_id", ["a"])

    def engine_check(c):
        session_of({"a": 1}, c.session_id)
        return c.session_id, c

    accepted, errors = validate([chunk("a"), odd], engine_check, ["a"], lambda sid, like: InputChunk.silent(sid, 0, 0.0, 160))
    assert not accepted["a"].missing and errors[repr(odd)[:64]].code == "unknown_session"


def test_session_of_refuses_unknown_and_non_string_ids():
    sessions = {"a": 1}
    assert session_of(sessions, "a") == 1
    for bad in ("b", 3, None):
        with pytest.raises(ProtocolError) as e:
            session_of(sessions, bad)
        assert e.value.code == "unknown_session"
