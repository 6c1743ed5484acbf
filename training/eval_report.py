"""The evaluation's report: the metrics table of an `evaluate` result, and a timeline image of one
dialogue's speech lanes (matplotlib if installed, else a raster PNG written with no imaging library).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from training.eval_harness import ENDPOINT_MS
from training.eval_metrics import HOLD_AFTER_S, MERGE_GAP_S, SYSTEMS, TAKEOVER_S

ROWS = [  # (label, metric, field, better)
    ("pause handling: take-over rate", "pause", "takeover_rate", "lower"),
    ("turn-taking: take-over rate", "turn_taking", "takeover_rate", "higher"),
    ("turn-taking: latency (s)", "turn_taking", "latency_s", "lower"),
    ("turn-taking: latency, median (s)", "turn_taking", "latency_median_s", "lower"),
    ("interruption: take-over rate", "interruption", "takeover_rate", "higher"),
    ("interruption: stop latency (s)", "interruption", "stop_latency_s", "lower"),
    ("interruption: stop latency, median (s)", "interruption", "stop_latency_median_s", "lower"),
    ("interruption: response latency (s)", "interruption", "response_latency_s", "lower"),
    ("backchannel: take-over rate", "backchannel", "takeover_rate", "lower"),
    ("timing score (+-1 s)", "timing", "score", "higher"),
    ("counting score", "counting", "score", "higher"),
]

FOOTNOTE = (f"Silero VAD on each system's output audio, default settings, gaps under {MERGE_GAP_S} s merged. A take-over is one "
            f"merged segment of >= {TAKEOVER_S:g} s (FDB's ASR rule, under 1 s and <= 3 words is no take-over, replaced by this "
            "speech-duration rule); latencies are means (FDB's figure; medians beside them) over take-overs (stop latency: over interruptions it was speaking at). "
            f"Backchannel: a take-over unless one segment spans it and {HOLD_AFTER_S} s beyond. Harness: Silero VAD, "
            f"{ENDPOINT_MS} ms endpointing, barge-in on detected speech, replaying the script's reply to the turn it heard (its content is an oracle's). "
            "Script: the dialogue's own scripted model channel, the behaviour the data asks for.")


def table(result: dict) -> str:
    m = result["metrics"]

    def cell(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [f"{result['dialogues']} dialogues ({result['audio_s']:.0f} s) from {result['data']}; model: {result['model']} (onset margin {result.get('onset_margin', 0.0):g}) "
             f"(stepped at {result['real_time_factor']['model']:g}x real time, {result['batch']} sessions an engine)",
             f"{'metric':<40} {'model':>7} {'harness':>8} {'script':>7}  {'better':<6} {'n':>4}",
             "-" * 78]
    for label, metric, fld, better in ROWS:
        cells = " ".join(f"{cell(m[name][metric][fld]):>{w}}" for name, w in zip(SYSTEMS, (7, 8, 7)))
        lines.append(f"{label:<40} {cells}  {better:<6} {m['model'][metric]['n']:>4}")
    speaking = lambda k: ", ".join(f"{name} {m[name][k]['n_speaking']}/{m[name][k]['n']}" for name in SYSTEMS)  # noqa: E731
    lines.append(f"speaking when the user interrupted: {speaking('interruption')}; at a backchannel: {speaking('backchannel')}")
    lines.append(FOOTNOTE)
    return "\n".join(lines)


LANES = [("user", (70, 110, 200)), ("script", (150, 150, 150)), ("model", (220, 110, 40)), ("harness", (60, 160, 80))]


def plot_timeline(timeline: dict, path: str | Path) -> str:
    """A PNG of one dialogue's speech lanes: user (labels), the script's model speech, the model
    and the harness (VAD). With matplotlib if it is installed, else a plain raster. -> the writer used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]  (optional: a plain raster without it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        write_png(path, raster_timeline(timeline))
        return "raster"
    fig, ax = plt.subplots(figsize=(12, 2.6))
    for i, (name, colour) in enumerate(LANES):
        spans = [(a, b - a) for a, b in timeline[name]]
        ax.broken_barh(spans, (len(LANES) - 1 - i - 0.35, 0.7), color=[c / 255 for c in colour])
    ax.set_yticks(range(len(LANES)), [n for n, _ in reversed(LANES)])
    ax.set_xlim(0, timeline["duration_s"])
    ax.set_xlabel("time (s)")
    ax.set_title(timeline["session_id"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


_GLYPHS = {  # 3x5 pixel font, rows top to bottom
    "A": "010101111101101", "C": "011100100100011", "D": "110101101101110", "E": "111100110100111",
    "H": "101101111101101", "I": "111010010010111", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "0": "111101101101111",
    "1": "010110010010111", "2": "110001010100111", "3": "110001010001110", "4": "101101111001001",
    "5": "111100110001110", "6": "011100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001110", " ": "000000000000000",
}


def _text(img: np.ndarray, s: str, x: int, y: int, scale: int = 3, colour=(0, 0, 0)) -> None:
    for ch in s.upper():
        g = _GLYPHS.get(ch)
        if g is not None:
            bits = np.array([int(c) for c in g], bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
            h, w = bits.shape
            img[y:y + h, x:x + w][bits[: img.shape[0] - y, : img.shape[1] - x]] = colour
        x += 4 * scale


def raster_timeline(timeline: dict, width: int = 1200, lane_h: int = 34, gap: int = 12) -> np.ndarray:
    """The timeline as an RGB uint8 image: a labelled lane per row, a tick every second."""
    left, top = 130, 14
    height = top + len(LANES) * (lane_h + gap) + 36
    img = np.full((height, width, 3), 255, np.uint8)
    span = max(timeline["duration_s"], 1e-6)
    px = (width - left - 14) / span

    def x_of(t: float) -> int:
        return int(round(left + min(max(t, 0.0), span) * px))

    for i, (name, colour) in enumerate(LANES):
        y = top + i * (lane_h + gap)
        img[y:y + lane_h, left:x_of(span)] = (240, 240, 240)
        for a, b in timeline[name]:
            img[y:y + lane_h, x_of(a):max(x_of(b), x_of(a) + 1)] = colour
        _text(img, name, 8, y + (lane_h - 15) // 2)
    axis = top + len(LANES) * (lane_h + gap)
    img[axis, left:x_of(span)] = 0
    for s in range(int(span) + 1):
        img[axis:axis + (8 if s % 5 == 0 else 4), x_of(s)] = 0
        if s % 5 == 0:
            _text(img, str(s), x_of(s) - 2, axis + 12, scale=2)
    return img


def write_png(path: str | Path, img: np.ndarray) -> None:
    """An RGB uint8 (H, W, 3) image as a PNG, with no imaging library."""
    import struct

    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
