"""The soak's memory plot: RSS over time, one panel per actor process, as a PNG (matplotlib if it
is installed, else a plain raster written with no imaging library)."""

from __future__ import annotations

import numpy as np


def plot_rss(samples: list[dict], roles: dict[int, str], t_start: float, path: str) -> str:
    """RSS over time, one panel per actor process; -> the writer used."""
    series = []
    for pid, role in sorted(roles.items(), key=lambda kv: (kv[1], kv[0])):
        pts = [((s["t"] - t_start) / 60, s["rss_mb"][pid]) for s in samples if s["rss_mb"].get(pid) is not None]
        if pts:
            series.append((f"{role} {pid}", np.array(pts)))
    if not series:
        return "none"
    try:
        import matplotlib  # pyright: ignore[reportMissingImports]  (optional: a plain raster without it)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]
    except ImportError:
        from training.eval_report import write_png

        write_png(path, _raster(series))
        return "raster"
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 2.2 * len(series)), sharex=True, squeeze=False)
    for ax, (label, pts) in zip(axes[:, 0], series):
        ax.plot(pts[:, 0], pts[:, 1], marker=".")
        ax.set_ylabel("RSS MB")
        ax.set_title(label, loc="left", fontsize=9)
    axes[-1, 0].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _raster(series: list[tuple[str, np.ndarray]], width: int = 1000, panel_h: int = 150) -> np.ndarray:
    """Panels of RSS (MB) against minutes as an RGB image, labelled with a 3x5 pixel font."""
    left, right, top, gap = 120, 30, 30, 50
    height = top + len(series) * (panel_h + gap)
    img = np.full((height, width, 3), 255, np.uint8)
    t_max = max(float(pts[:, 0].max()) for _, pts in series) or 1.0
    colours = [(220, 110, 40), (60, 110, 200), (60, 160, 80), (150, 60, 160), (120, 120, 120)]
    for i, (label, pts) in enumerate(series):
        y0 = top + i * (panel_h + gap)
        lo, hi = float(pts[:, 1].min()), float(pts[:, 1].max())
        pad = max((hi - lo) * 0.1, hi * 0.01, 1.0)
        lo, hi = lo - pad, hi + pad
        img[y0 : y0 + panel_h, left : width - right] = (245, 245, 245)
        xs = left + pts[:, 0] / t_max * (width - left - right - 1)
        ys = y0 + panel_h - 1 - (pts[:, 1] - lo) / (hi - lo) * (panel_h - 1)
        for (xa, ya), (xb, yb) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            n = int(max(abs(xb - xa), abs(yb - ya))) + 1
            for x, y in zip(np.linspace(xa, xb, n), np.linspace(ya, yb, n)):
                img[int(round(y)) - 1 : int(round(y)) + 1, int(round(x)) : int(round(x)) + 2] = colours[i % len(colours)]
        _text(img, f"{label}  RSS MB", left, y0 - 20)
        _text(img, f"{hi:.0f}", 6, y0, scale=2)
        _text(img, f"{lo:.0f}", 6, y0 + panel_h - 10, scale=2)
        axis = y0 + panel_h
        img[axis, left : width - right] = 0
        for m in range(int(t_max) + 1):
            x = int(left + m / t_max * (width - left - right - 1))
            img[axis : axis + 5, x] = 0
            _text(img, str(m), x - 2, axis + 8, scale=2)
        _text(img, "MIN", 6, axis + 8, scale=2)
    return img


_MORE_GLYPHS = {
    "G": "011100101101011", "B": "110101110101110", "K": "101101110101101", "W": "101101101111101",
    "F": "111100110100100", "V": "101101101101010", "Y": "101101010010010", "X": "101101010101101",
    "-": "000000111000000", ".": "000000000000010", "_": "000000000000111", "%": "101001010100101",
}


def _text(img: np.ndarray, s: str, x: int, y: int, scale: int = 3) -> None:
    from training.eval_report import _GLYPHS

    glyphs = {**_GLYPHS, **_MORE_GLYPHS}
    for ch in s.upper():
        g = glyphs.get(ch)
        if g is not None:
            bits = np.array([int(c) for c in g], bool).reshape(5, 3).repeat(scale, 0).repeat(scale, 1)
            h, w = bits.shape
            view = img[y : y + h, x : x + w]
            view[bits[: view.shape[0], : view.shape[1]]] = 0
        x += 4 * scale
