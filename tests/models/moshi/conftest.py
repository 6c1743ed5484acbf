"""Moshi-family tests: one small random checkpoint (the `moshi` package's own modules, random
weights) written once per run; without the package they are skipped."""

import os

import numpy as np
import pytest

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # the package's lazy torch.compile: ~15 s per process on CPU
pytest.importorskip("moshi")

from protocols.chunks import InputChunk  # noqa: E402


@pytest.fixture(scope="session")
def moshi_dir(tmp_path_factory):
    from models.moshi.random_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("moshi") / "small", "small", seed=0)


def voice(seed: int, k: int, n: int = 1280) -> np.ndarray:
    """Tick k of session `seed`'s input: a session-specific tone chord plus noise, loud enough for
    Mimi's codes to follow it."""
    rng = np.random.default_rng([seed, k])
    t = (np.arange(n) + k * n) / 16_000
    f = 120 + 60 * seed
    x = 0.3 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 2.7 * f * t) + 0.1 * rng.standard_normal(n)
    return (x * 32767 * (0.5 + 0.5 * ((k // 3 + seed) % 2))).astype(np.int16)


def chunk(sid: str, seed: int, k: int, **kw) -> InputChunk:
    return InputChunk(sid, k, k * 0.08, voice(seed, k), **kw)
