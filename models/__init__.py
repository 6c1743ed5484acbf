"""The interaction model in PyTorch, usable without Ray: config presets, features, early-fusion
embeddings, the MoE transformer, heads, vocoder, the input builder shared by serving and training,
the batched streaming engine, checkpoints."""

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import PRESETS, InteractionConfig
from models.engine import StreamingEngine
from models.inputs import InputBuilder
from models.model import InteractionModel, TickInputs, build_model

__all__ = [
    "PRESETS",
    "InteractionConfig",
    "InputBuilder",
    "InteractionModel",
    "StreamingEngine",
    "TickInputs",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
