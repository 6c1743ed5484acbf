"""The report's PNG writer: what it writes decodes back to the image."""

from __future__ import annotations

import zlib

import numpy as np

from training.eval_report import write_png


def test_write_png_round_trips(tmp_path):
    img = np.zeros((3, 4, 3), np.uint8)
    img[1, 2] = (10, 20, 30)
    write_png(tmp_path / "x.png", img)
    b = (tmp_path / "x.png").read_bytes()
    i = b.index(b"IDAT")
    n = int.from_bytes(b[i - 4:i], "big")
    raw = np.frombuffer(zlib.decompress(b[i + 4:i + 4 + n]), np.uint8).reshape(3, 1 + 4 * 3)
    assert (raw[:, 0] == 0).all() and np.array_equal(raw[:, 1:].reshape(3, 4, 3), img)
