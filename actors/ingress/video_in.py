"""Video in: the newest frame per tick, centre-cropped and resized for the model; no Ray, no network.

- `resize_frame(frame, size)`: uint8 (H, W, 3) -> uint8 (size, size, 3): centre crop, then
  area averaging (shrinking) or bilinear (growing), as torch's `F.interpolate` does.
- `FrameSampler`: keeps the newest frame and hands it out once (`take()`), resized.
"""

from __future__ import annotations

import functools

import av
import numpy as np


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: area averaging when shrinking, bilinear when growing.

    Matches torch's F.interpolate(mode="area") / (mode="bilinear", align_corners=False), so a
    frame resized here equals one resized with torch (as training data pipelines do).
    """
    m = np.zeros((n_out, n_in), np.float32)
    if n_in >= n_out:
        for i in range(n_out):
            a, b = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
            m[i, a:b] = 1.0 / (b - a)
    else:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (src - i0).astype(np.float32)
        m[np.arange(n_out), i0] += 1.0 - w1
        m[np.arange(n_out), i1] += w1
    return m


def resize_frame(frame: np.ndarray, size: int = 160) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): centre-crop to a square, then resize."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[top : top + side, left : left + side].astype(np.float32)
    m = _resize_matrix(side, size)
    out = np.einsum("ij,jkc,lk->ilc", m, square, m, optimize=True)  # rows, then columns
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class FrameSampler:
    """Keeps only the newest video frame; `take()` returns it once, resized to size x size RGB.

    Called once per tick, this yields the latest frame of that tick (or None if no new frame
    came). Decoding to RGB and resizing happen in `take()`, so dropped frames cost nothing.
    """

    def __init__(self, size: int = 160):
        self.size = size
        self._latest = None
        self.frames_in = 0

    def push(self, frame) -> None:
        """`frame`: a uint8 (H, W, 3) RGB array or an `av.VideoFrame`."""
        self._latest = frame
        self.frames_in += 1

    def take(self) -> np.ndarray | None:
        frame, self._latest = self._latest, None
        if frame is None:
            return None
        if isinstance(frame, av.VideoFrame):
            frame = frame.to_ndarray(format="rgb24")
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or min(frame.shape[:2]) == 0:
            return None
        return resize_frame(frame, self.size)
