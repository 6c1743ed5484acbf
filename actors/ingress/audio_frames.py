"""Audio frames: PyAV frames to and from int16 numpy samples; plain functions, no state.

- `to_av_frame(samples, rate)`: mono int16 samples -> a PyAV frame at `rate`.
- `resample_all(resampler, frame)`: everything the resampler gives for `frame` (None flushes it).
- `frame_to_samples(frame)`: a decoded PyAV frame -> int16 samples (n, channels) and its rate.
"""

from __future__ import annotations

import av
import numpy as np


def to_av_frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


def resample_all(resampler: av.AudioResampler, frame: av.AudioFrame | None) -> np.ndarray:
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def frame_to_samples(frame: av.AudioFrame) -> tuple[np.ndarray, int]:
    """A decoded PyAV audio frame -> (int16 (n, channels), rate)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    arr = arr if frame.format.is_planar else arr.reshape(-1, channels).T  # -> (channels, n)
    if arr.dtype.kind == "f":
        arr = np.clip(arr * 32767.0, -32768, 32767)
    return arr.T.astype(np.int16), frame.sample_rate
