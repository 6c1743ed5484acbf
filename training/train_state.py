"""The training state on disk, so a run resumes where it stopped.

`save_state` writes, atomically, the weights as served to `out` and the full training state
(weights, optimizer, step, history, recipe) to the state directory; `find_state` finds the last
complete one (a save interrupted midway leaves the previous one); `same_recipe` says which recipe
fields differ from a state's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.checkpoint import save_checkpoint
from models.model import InteractionModel, build_model
from training.recipe import Recipe

STATE_FILE = "train_state.pt"
RECIPE_FILE = "recipe.json"


def save_state(state_dir: Path, out: Path, model: InteractionModel, opt: torch.optim.Optimizer, step: int, recipe: Recipe,
               history: list[dict], out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Atomically: the weights to `out` in `out_dtype`, the training state to `state_dir`."""
    for final, write in ((state_dir, lambda p: _write_state(p, model, opt, step, recipe, history)),
                         (out, lambda p: save_weights(model, p, out_dtype))):
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def save_weights(model: InteractionModel, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The weights as served, in `dtype` (bfloat16 halves the file; the CPU engine computes in float32)."""
    shipped = build_model(model.cfg, "cpu", dtype)
    shipped.load_state_dict({k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()})
    return save_checkpoint(shipped, path)


def _write_state(path: Path, model, opt, step, recipe, history) -> None:
    save_checkpoint(model, path)
    torch.save({"step": step, "optimizer": opt.state_dict(), "history": history}, path / STATE_FILE)
    (path / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")


def find_state(state_dir: Path) -> Path | None:
    """The last complete training state (a save interrupted midway leaves the previous one)."""
    for p in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        if (p / STATE_FILE).is_file() and (p / RECIPE_FILE).is_file():
            return p
    return None


def same_recipe(a: dict, b: dict) -> list[str]:
    """Recipe fields that differ, `steps` aside (a run may be extended)."""
    norm = lambda d: {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}  # noqa: E731
    a, b = norm(a), norm(b)
    return sorted(k for k in set(a) | set(b) if k != "steps" and a.get(k) != b.get(k))
