"""Audio payloads of Realtime events: base64 PCM16 (audio/pcm) or G.711 (audio/pcmu, audio/pcma).

`decode_audio` turns an append's base64 audio into int16 samples, refusing what is not audio
(`ProtocolError`, never another exception); `encode_audio` is its inverse. G.711 is ITU-T's,
built here as lookup tables (no codec library).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from .chunks import ProtocolError
from .realtime_config import MAX_EVENT_BYTES


def _g711_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ITU-T G.711 as lookup tables: byte -> int16 for mu-law and A-law, and int16 (as uint16
    index) -> byte for each, built by decoding every byte and taking the nearest code."""
    codes = np.arange(256)
    # mu-law: complement, sign, 3-bit exponent, 4-bit mantissa; bias 132
    u = ~codes & 0xFF
    ulaw = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
    ulaw = np.where(u & 0x80, -ulaw, ulaw).astype(np.int16)
    # A-law: even bits inverted, sign (1 = positive), exponent, mantissa
    a = codes ^ 0x55
    mant, exp = a & 0x0F, (a >> 4) & 0x07
    alaw = np.where(exp == 0, (mant << 4) + 8, ((mant << 4) + 0x108) << np.maximum(exp - 1, 0))
    alaw = np.where(a & 0x80, alaw, -alaw).astype(np.int16)
    encode = []
    for table in (ulaw, alaw):
        order = np.argsort(table, kind="stable")
        values = table[order].astype(np.int32)
        x = np.arange(-32768, 32768)
        i = np.clip(np.searchsorted(values, x), 1, 255)
        nearer_low = (x - values[i - 1]) <= (values[i] - x)
        encode.append(order[np.where(nearer_low, i - 1, i)].astype(np.uint8)[np.arange(65536) ^ 0x8000])
    return ulaw, alaw, encode[0], encode[1]


ULAW_DECODE, ALAW_DECODE, ULAW_ENCODE, ALAW_ENCODE = _g711_tables()
_DECODE = {"audio/pcmu": ULAW_DECODE, "audio/pcma": ALAW_DECODE}
_ENCODE = {"audio/pcmu": ULAW_ENCODE, "audio/pcma": ALAW_ENCODE}


def decode_audio(b64: Any, kind: str = "audio/pcm", max_bytes: int = MAX_EVENT_BYTES) -> np.ndarray:
    """An append's base64 audio in format `kind` (audio/pcm: little-endian PCM16 mono; audio/pcmu,
    audio/pcma: G.711 bytes) -> int16 samples. ProtocolError "invalid_value" for empty audio,
    bad base64 or a PCM16 payload with an odd number of bytes."""
    if not isinstance(b64, str):
        raise ProtocolError("audio must be a base64 string", "invalid_type", "audio")
    if len(b64) > max_bytes * 4 // 3 + 4:
        raise ProtocolError("audio is larger than the event limit", "message_too_large", "audio")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("audio is not valid base64", "invalid_value", "audio") from None
    if not data:
        raise ProtocolError("audio is empty", "invalid_value", "audio")
    if kind in _DECODE:
        return _DECODE[kind][np.frombuffer(data, np.uint8)]
    if len(data) % 2:
        raise ProtocolError("PCM16 audio must have an even number of bytes", "invalid_value", "audio")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def encode_audio(samples: np.ndarray, kind: str = "audio/pcm") -> str:
    """int16 samples -> base64 in format `kind` (the inverse of `decode_audio`)."""
    x = np.asarray(samples, dtype=np.int16)
    if kind in _ENCODE:
        return base64.b64encode(_ENCODE[kind][x.view(np.uint16)].tobytes()).decode()
    return base64.b64encode(x.astype("<i2").tobytes()).decode()


def decode_pcm16(b64: str, max_bytes: int = MAX_EVENT_BYTES) -> np.ndarray:
    """base64 little-endian PCM16 mono -> int16 samples (see `decode_audio`)."""
    return decode_audio(b64, "audio/pcm", max_bytes)


def encode_pcm16(samples: np.ndarray) -> str:
    return encode_audio(samples, "audio/pcm")
