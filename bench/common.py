"""Helpers every benchmark shares: percentiles, a plain-text table, JSON results under bench/results/."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def actor(handle: object) -> Any:
    """A Ray actor handle, typed for calling its methods: Ray's annotations give `Cls.remote()` as
    the handle or the class (whose methods have no `.remote`), and an `ActorHandle`'s methods as Never."""
    return handle


def percentiles(samples: Iterable[float]) -> dict:
    """p50, p99, mean and count of `samples` (NaN figures for none)."""
    x = np.asarray(list(samples), dtype=float)
    if x.size == 0:
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan"), "n": 0}
    return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "mean": float(x.mean()), "n": int(x.size)}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != value or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
    return str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """`rows` as an aligned text table of `columns` (missing cells left blank)."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join((v.rjust(w) if i else v.ljust(w)) for i, (v, w) in enumerate(zip(row, widths))))


def write_json(name: str, obj: Any) -> str:
    """Write `obj` to bench/results/<name>.json and return the path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name if name.endswith(".json") else f"{name}.json")
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    return path
