"""The per-worker training loop: a few steps lower the loss, and a resumed run is the uninterrupted
one exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import build_model
from training.loss import loss_parts
from training.recipe import Recipe
from training.train_loop import train_loop
from training.train_state import STATE_FILE
from training.windows import load_dialogues, window

CFG = InteractionConfig.preset("tiny")


def recipe(root: Path, **kw) -> Recipe:
    return Recipe(data=str(root), batch=2, warmup=1, crop_s=(4.0, 6.0), **kw)


def config(r: Recipe, where: Path, **kw) -> dict:
    return {"recipe": r.to_dict(), "out": str(where / "out"), "state": str(where / "state"), "threads": 1,
            "save_every_s": 1e9, "log_every": 1, **kw}


def test_a_few_training_steps_decrease_the_loss(tiny_set, tmp_path):
    r = recipe(tiny_set, steps=6, lr=3e-3)
    torch.manual_seed(r.seed)
    before = build_model(CFG)  # the run's initial weights
    train_loop(config(r, tmp_path))
    after = load_checkpoint(tmp_path / "state", dtype=torch.float32)
    d = load_dialogues(sorted((tiny_set / "train").glob("*.parquet"))[:1], CFG)[0]
    inp, tgt = window(InputBuilder(CFG), d, np.random.default_rng(123), r)

    def loss(model):
        with torch.no_grad():
            parts = loss_parts(model.train(), inp, tgt, torch.ones(len(CONTROLS)), torch.Generator().manual_seed(0))
        return {k: float(v) for k, v in parts.items()}

    lb, la = loss(before), loss(after)
    assert la["loss"] < lb["loss"] - 1.0, (lb, la)
    assert la["ctrl"] < lb["ctrl"] and la["text"] < lb["text"] and la["flow"] < lb["flow"], (lb, la)
    # What serve loads: bfloat16 weights with their config, the state's weights rounded.
    shipped = load_checkpoint(tmp_path / "out")
    assert shipped.cfg == CFG and shipped.dtype == torch.bfloat16


def test_a_resumed_run_is_the_uninterrupted_run(tiny_set, tmp_path):
    # Its own speech fed back from step 1 and its own controls from step 3, after the interruption:
    # the schedule is a function of the step, so the resumed run feeds back the same.
    r = recipe(tiny_set, steps=4, self_feed_from=1, self_feed_controls_from=3)
    train_loop(config(r, tmp_path / "a"))
    train_loop(config(r, tmp_path / "b", stop_at=2))  # interrupted after step 2
    assert torch.load(tmp_path / "b" / "state" / STATE_FILE, weights_only=False)["step"] == 2
    train_loop(config(r, tmp_path / "b"))  # the same command again
    sa, sb = (torch.load(tmp_path / w / "state" / STATE_FILE, weights_only=False) for w in ("a", "b"))
    assert sa["step"] == sb["step"] == 4
    assert [{k: v for k, v in h.items() if k != "t"} for h in sa["history"]] == [{k: v for k, v in h.items() if k != "t"} for h in sb["history"]]
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k in oa["state"][i]:
            assert torch.equal(oa["state"][i][k], ob["state"][i][k]), (i, k)
    ma, mb = (load_checkpoint(tmp_path / w / "state").state_dict() for w in ("a", "b"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
