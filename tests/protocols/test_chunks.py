import numpy as np
import pytest

from protocols import InputChunk, OutputChunk, ProtocolError, TickClock

SAMPLES = TickClock(0.0, 200).samples()  # one 200 ms tick at 16 kHz


def audio(n=SAMPLES, dtype=np.int16):
    return (np.arange(n) % 100).astype(dtype)


def test_valid_chunks_construct():
    c = InputChunk("s1", 3, 0.6, audio(), frame=np.zeros((160, 160, 3), np.uint8), text="hi")
    assert c.seq == 3 and c.frame.shape == (160, 160, 3)
    o = OutputChunk("s1", 3, 0.6, audio(), text="yo", controls=["speak"])
    assert o.controls == ["speak"]


@pytest.mark.parametrize(
    "kwargs, code",
    [
        (dict(audio=audio(dtype=np.float32)), "invalid_audio"),
        (dict(audio=audio(n=0)), "invalid_audio"),
        (dict(audio=audio(n=16_000 * 2 + 400)), "invalid_audio"),  # longer than the longest tick
        (dict(audio=audio().reshape(2, -1)), "invalid_audio"),
        (dict(audio=list(range(SAMPLES))), "invalid_audio"),
        (dict(frame=np.zeros((150, 160, 3), np.uint8)), "invalid_frame"),
        (dict(frame=np.zeros((160, 160), np.uint8)), "invalid_frame"),
        (dict(frame=np.zeros((160, 160, 3), np.float32)), "invalid_frame"),
        (dict(frame=np.zeros((1280, 1280, 3), np.uint8)), "invalid_frame"),
        (dict(text="x" * 5000), "invalid_text"),
        (dict(session_id=""), "invalid_session"),
        (dict(seq=-1), "invalid_value"),
    ],
)
def test_bad_input_chunk_is_refused_with_a_reason(kwargs, code):
    args = dict(session_id="s1", seq=0, t_start=0.0, audio=audio())
    args.update(kwargs)
    with pytest.raises(ProtocolError) as info:
        InputChunk(**args)
    assert info.value.code == code
    assert str(info.value)


def test_unknown_control_is_refused():
    with pytest.raises(ProtocolError, match="unknown control"):
        OutputChunk("s1", 0, 0.0, audio(), controls=["shout"])


def test_silent_chunk_is_missing_and_silent():
    c = InputChunk.silent("s1", 7, 1.4, SAMPLES)
    assert c.missing and not c.audio.any() and c.audio.shape == (SAMPLES,)


def test_any_tick_length_is_a_chunk_and_check_audio_can_want_one():
    from protocols.chunks import check_audio

    assert InputChunk("s1", 0, 0.0, audio(3_199)).audio.shape == (3_199,)  # the engine checks its tick's length
    for tick_ms in (80, 100, 160, 200, 400):
        n = TickClock(0.0, tick_ms).samples()
        assert InputChunk("s1", 0, 0.0, audio(n)).audio.shape == (n,)
    with pytest.raises(ProtocolError, match="must hold 3200 samples"):
        check_audio(audio(1_600), samples=SAMPLES)
    assert check_audio(audio(), samples=SAMPLES).shape == (SAMPLES,)
