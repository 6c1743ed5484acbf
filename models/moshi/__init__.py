"""Moshi-family full-duplex checkpoints (Kyutai Moshi, NVIDIA PersonaPlex fine-tunes, Hibiki)
behind the `Engine` port: `MoshiEngine` (engine.py), the checked local checkpoint loader
(checkpoint.py), per-session seeded sampling (sampling.py), 16 <-> 24 kHz streaming resampling
(resample.py), per-row streaming state (rows.py, session.py) and a random small checkpoint in
Kyutai's layout (random_checkpoint.py).

It runs the `moshi` PyPI package's own modules (0.2.13, installed with --no-deps: it declares
torch<2.10 but imports and runs on the pinned torch 2.13, and its LMGen and Mimi already have
per-row reset and execution masks and a ring KV cache bounded by `context`), so a checkpoint
means what it means in Kyutai's code; tests/models/moshi checks the engine against the package
stepping each session alone. Nothing here imports Ray.
"""
