"""The interaction model in PyTorch, usable without Ray: config presets, features, early-fusion
embeddings, the MoE transformer, heads, vocoder, the batched streaming engine, checkpoints."""

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import PRESETS, InteractionConfig
from models.engine import StreamingEngine
from models.model import InteractionModel, TickInputs, build_model

__all__ = [
    "PRESETS",
    "InteractionConfig",
    "InteractionModel",
    "StreamingEngine",
    "TickInputs",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
