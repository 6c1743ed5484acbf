"""Checkpoints: a directory with config.json + model.safetensors; round trips are exact."""

from __future__ import annotations

import json

import pytest
import torch

from models.checkpoint import load_checkpoint, load_config, save_checkpoint
from models.engine import StreamingEngine
from models.model import InteractionModel
from tests.models.helpers import make_chunk, micro, step_ok


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    model = InteractionModel(micro(d_model=48, head_dim=12, tick_ms=300, window=32))
    save_checkpoint(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors"}
    assert load_config(tmp_path / "ckpt") == model.cfg

    back = load_checkpoint(tmp_path / "ckpt")
    assert back.cfg == model.cfg and back.cfg.tick_ms == 300 and not back.training
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)

    e1, e2 = StreamingEngine(model, max_sessions=1), StreamingEngine(back, max_sessions=1)
    for e in (e1, e2):
        e.add_session("a")
    for k in range(5):
        o1, o2 = step_ok(e1, [make_chunk("a", k, 0, tick_ms=300)])[0], step_ok(e2, [make_chunk("a", k, 0, tick_ms=300)])[0]
        assert (o1.audio == o2.audio).all() and o1.text == o2.text and o1.controls == o2.controls


def test_bf16_round_trip_keeps_dtype(tmp_path):
    torch.manual_seed(1)
    model = InteractionModel(micro()).to(torch.bfloat16)
    save_checkpoint(model, tmp_path)
    back = load_checkpoint(tmp_path)
    assert back.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert load_checkpoint(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    save_checkpoint(InteractionModel(micro()), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_checkpoint(tmp_path)
    cfg["format"] = "something-else/9"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(tmp_path)
