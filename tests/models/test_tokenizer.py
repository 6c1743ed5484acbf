import pytest

from models.tokenizer import ByteTokenizer, IncrementalDecoder
from protocols.chunks import CONTROLS

TEXT = "Hi 👋 — café, naïve; 日本語 and 👩‍👩‍👧 done."


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_round_trip_mixed_text(tok):
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == TEXT


def test_truncation_never_splits_a_code_point(tok):
    full = len(TEXT.encode("utf-8"))
    for limit in range(full + 2):
        ids = tok.encode(TEXT, max_tokens=limit)
        assert len(ids) <= limit
        text = tok.decode(ids)
        assert "\ufffd" not in text and TEXT.startswith(text)
        assert len(ids) > limit - 4  # backs off at most one partial code point
    assert tok.encode("👋", max_tokens=3) == []


def test_decode_ignores_specials_and_replaces_bad_bytes(tok):
    ids = [tok.time_id, *tok.encode("ok"), tok.control_ids["speak"], tok.eot_id]
    assert tok.decode(ids) == "ok"
    assert tok.decode([0xFF, *tok.encode("a")]) == "\ufffda"


def test_special_and_control_ids_are_distinct_and_in_vocab(tok):
    specials = [tok.pad_id, tok.time_id, tok.out_id, tok.bg_id, tok.txt_id, tok.eot_id]
    assert specials == list(range(256, 262))
    controls = [tok.control_ids[name] for name in tok.control_names]
    assert tok.control_names == list(CONTROLS)
    assert controls == list(range(262, 262 + len(CONTROLS)))
    ids = specials + controls
    assert len(set(ids)) == len(ids) and max(ids) < tok.vocab_size == 256 + len(ids)


def test_incremental_decoder_byte_by_byte(tok):
    decoder = IncrementalDecoder()
    pieces = [decoder.feed([i]) for i in tok.encode(TEXT)]
    assert "".join(pieces) == TEXT
    assert "\ufffd" not in "".join(pieces)
    wave = TEXT.encode("utf-8").index("👋".encode("utf-8"))
    assert pieces[wave : wave + 3] == ["", "", ""] and pieces[wave + 3] == "👋"  # held back, then whole
    assert decoder.state() == b""


def test_incremental_decoder_skips_specials_and_flushes(tok):
    decoder = IncrementalDecoder()
    assert decoder.feed([tok.out_id, *tok.encode("a"), tok.time_id, 0xF0, 0x9F]) == "a"
    assert decoder.flush() == "\ufffd"  # a turn ending mid code point


def test_incremental_decoder_state_export_import(tok):
    ids = tok.encode("x👋y")
    first = IncrementalDecoder()
    assert first.feed(ids[:3]) == "x"
    pending = first.state()
    assert pending == "👋".encode("utf-8")[:2]
    second = IncrementalDecoder.from_state(pending)
    assert second.feed(ids[3:]) == "👋y"
