"""Synthetic video: one shape on a plain background repeating a motion a known number of times.

`motion_frames(shape, motion, count, period_ticks, ...)` returns one uint8 (size, size, 3) RGB frame
per tick: `count` repetitions of `period_ticks` ticks each, then the shape at rest. A repetition
goes out and back (bounce, slide, pulse) or off and on (blink), so each one is visible at a frame a
tick.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle")
MOTIONS = ("bounce", "slide", "pulse", "blink")


def draw(shape: str, cx: float, cy: float, r: float, colour, background, size: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif shape == "square":
        mask = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":  # apex up: inside three half-planes
        mask = (dy <= r * 0.8) & (dy >= -r + 2 * np.abs(dx) * 0.9)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    frame = np.empty((size, size, 3), np.uint8)
    frame[:] = background
    frame[mask] = colour
    return frame


def motion_frames(shape: str, motion: str, count: int, period_ticks: int, rest_ticks: int, colour, background,
                  size: int = 160) -> list[np.ndarray]:
    """`count` repetitions of `motion`, `period_ticks` frames each, then `rest_ticks` frames at rest."""
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; known: {MOTIONS}")
    if period_ticks < 2:
        raise ValueError("a repetition needs at least two frames to be seen")
    c, r = size / 2, size * 0.14
    frames = []
    for k in range(count * period_ticks + rest_ticks):
        moving = k < count * period_ticks
        phase = (k % period_ticks) / period_ticks if moving else 0.0
        out = np.sin(np.pi * phase)  # 0 at rest, 1 at the far point of a repetition
        x, y, rr, visible = c, c, r, True
        if motion == "bounce":
            y = c + size * 0.25 - out * size * 0.5
        elif motion == "slide":
            x = c - size * 0.25 + out * size * 0.5
        elif motion == "pulse":
            rr = r * (1 + 1.2 * out)
        elif motion == "blink":
            visible = not (moving and phase >= 0.5)
        if visible:
            frames.append(draw(shape, x, y, rr, colour, background, size))
        else:
            frames.append(np.broadcast_to(np.asarray(background, np.uint8), (size, size, 3)).copy())
    return frames
