import base64

import numpy as np
import pytest

from protocols import ProtocolError
from protocols.realtime_audio import decode_audio, decode_pcm16, encode_audio, encode_pcm16


def test_pcm16_round_trip_and_bad_audio():
    samples = np.array([0, 1, -1, 32767, -32768], dtype=np.int16)
    assert np.array_equal(decode_pcm16(encode_pcm16(samples)), samples)
    for bad, message in [("***", "base64"), ("", "empty"), ("AAA", "base64"), ("é", "base64")]:
        with pytest.raises(ProtocolError, match=message) as info:
            decode_pcm16(bad)
        assert info.value.code == "invalid_value" and info.value.param == "audio"


def test_g711_tables_are_the_standard_ones():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # the standard library's G.711 (until Python 3.13): the reference
    every_byte = bytes(range(256))
    for kind, to_linear, from_linear in [("audio/pcmu", audioop.ulaw2lin, audioop.lin2ulaw), ("audio/pcma", audioop.alaw2lin, audioop.lin2alaw)]:
        reference = np.frombuffer(to_linear(every_byte, 2), "<i2")
        assert np.array_equal(decode_audio(base64.b64encode(every_byte).decode(), kind), reference)
        x = np.arange(-32768, 32768, dtype=np.int16)
        ours = decode_audio(encode_audio(x, kind), kind).astype(np.int64)
        theirs = np.frombuffer(to_linear(from_linear(x.tobytes(), 2), 2), "<i2").astype(np.int64)
        assert np.all(np.abs(ours - x) <= np.abs(theirs - x))  # the nearest code: never worse than audioop's
        assert len(base64.b64decode(encode_audio(x[:160], kind))) == 160  # a byte a sample


def test_odd_byte_count_is_refused():
    with pytest.raises(ProtocolError, match="even number"):
        decode_pcm16(base64.b64encode(b"\x01\x02\x03").decode())
