"""Checkpoints are directories: `config.json` (the InteractionConfig) + `model.safetensors`, and
optionally `decision.json`: the operating point its decisions were calibrated at (`onset_margin`,
see `models.engine.StreamingEngine`), chosen on a validation set, not learned, so kept beside the
weights rather than in the model's config.

The config also rides in the safetensors header, so a lone weights file still says what it is.
Round trips are exact: tensors are saved as they are, in their dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import InteractionConfig
from models.model import InteractionModel, build_model

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DECISION_FILE = "decision.json"
FORMAT = "interplay-interaction-model/1"


def save_checkpoint(model: InteractionModel, path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, **model.cfg.to_dict()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT, "config": json.dumps(model.cfg.to_dict())})
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_config(path: str | Path) -> InteractionConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory: no {CONFIG_FILE}")
    d = json.loads(cfg_file.read_text())
    fmt = d.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{cfg_file}: format {fmt!r} is not {FORMAT!r}")
    return InteractionConfig.from_dict(d)


def load_decision(path: str | Path) -> dict:
    """The checkpoint's calibrated decision settings ({} when it has none)."""
    f = Path(path) / DECISION_FILE
    if not f.is_file():
        return {}
    d = json.loads(f.read_text())
    if not isinstance(d.get("onset_margin", 0.0), (int, float)):
        raise ValueError(f"{f}: onset_margin must be a number")
    return {"onset_margin": float(d.get("onset_margin", 0.0))}


def onset_margin(checkpoint: str | Path | None, override: float | None = None) -> float:
    """The margin an engine runs at: `override` if given, else the checkpoint's calibrated one,
    else 0 (random weights, or a checkpoint never calibrated)."""
    if override is not None:
        return float(override)
    return load_decision(checkpoint).get("onset_margin", 0.0) if checkpoint else 0.0


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> InteractionModel:
    """-> the model, in eval mode, on `device`, in the saved dtype unless `dtype` is given."""
    path = Path(path)
    cfg = load_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    saved_dtype = next(iter(state.values())).dtype if state else torch.float32
    # Built for real (not on meta + to_empty): non-persistent buffers must be computed, not left empty.
    model = build_model(cfg, device, dtype or saved_dtype)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights}: missing tensors {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
