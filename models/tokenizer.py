"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then special tokens, then one id per control.

Text is never split inside a code point when truncated, and `IncrementalDecoder` streams text out
tick by tick, holding back an incomplete UTF-8 sequence until the rest of its bytes arrive.
"""

from __future__ import annotations

import codecs

from protocols.chunks import CONTROLS

SPECIALS = ("PAD", "TIME", "OUT", "BG", "TXT", "EOT")


class ByteTokenizer:
    """PAD pads; TIME marks a micro-turn; OUT is the query position the model predicts from;
    BG opens a background update; TXT opens typed user text; EOT ends the text of a turn."""

    def __init__(self) -> None:
        self.pad_id, self.time_id, self.out_id, self.bg_id, self.txt_id, self.eot_id = range(256, 256 + len(SPECIALS))
        first_control = 256 + len(SPECIALS)
        self.control_names: list[str] = list(CONTROLS)
        self.control_ids: dict[str, int] = {name: first_control + i for i, name in enumerate(CONTROLS)}
        self.vocab_size = first_control + len(CONTROLS)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        data = text.encode("utf-8")
        if max_tokens is not None and len(data) > max_tokens:
            cut = max(max_tokens, 0)
            while cut > 0 and data[cut] & 0xC0 == 0x80:  # back off continuation bytes to a code point start
                cut -= 1
            data = data[:cut]
        return list(data)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streams bytes to text: `feed` returns what is complete, keeping an unfinished code point."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: list[int]) -> str:
        return self._decoder.decode(bytes(i for i in ids if 0 <= i < 256))

    def flush(self) -> str:
        """End of stream: a still-incomplete sequence comes out as U+FFFD."""
        return self._decoder.decode(b"", final=True)

    def state(self) -> bytes:
        return self._decoder.getstate()[0]

    @classmethod
    def from_state(cls, pending: bytes) -> "IncrementalDecoder":
        decoder = cls()
        decoder._decoder.setstate((bytes(pending), 0))
        return decoder
