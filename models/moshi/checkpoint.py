"""Moshi-family checkpoints from a local directory in Kyutai's layout; nothing is downloaded.

A directory holds the LM's safetensors, Mimi's safetensors and a SentencePiece text tokenizer,
and optionally `config.json`: the LM's kwargs plus `moshi_name`, `mimi_name`, `tokenizer_name`,
`mimi_config_name`, `lora_name`, `model_type` (as `moshi.models.loaders.CheckpointInfo` reads it).
Without a config it is Moshi 7B under Kyutai's default file names (`kyutai/moshiko-pytorch-bf16`;
PersonaPlex fine-tunes ship the same files, Hibiki says `model_type: hibiki`).

`read_checkpoint` checks everything before any weight is loaded: each file is there, the tokenizer
reads and fits the LM's text vocabulary, every tensor in each safetensors file is one the model
built from the config has, at the same shape. A problem raises `CheckpointError` naming the
file (and the tensor) and saying where a servable directory comes from (`WHERE`). `load` then
builds the models with the `moshi` package's own loaders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Kyutai's default names (moshi.models.loaders), used where config.json does not name a file.
LM_NAME = "model.safetensors"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
DEFAULT_REPO = "kyutai/moshiko-pytorch-bf16"
WHERE = (f"A Moshi-family checkpoint is a local directory in Kyutai's layout: a copy of {DEFAULT_REPO} "
         f"({LM_NAME}, {MIMI_NAME}, {TOKENIZER_NAME}), a PersonaPlex or Hibiki one (its config.json names "
         "its files), or random weights made by `python -m models.moshi.random_checkpoint DIR`.")
FILE_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "lora_name", "model_type",
             "lm_gen_config", "tts_config", "stt_config", "model_id")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; `path` is the file at fault. The message
    ends with `WHERE`: what a servable directory holds and where one comes from."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(f"{path}: {message}. {WHERE}" if path is not None else f"{message}. {WHERE}")
        self.path = None if path is None else Path(path)


@dataclass
class MoshiCheckpoint:
    """A checked checkpoint directory: its files and configs (no weights loaded yet)."""

    path: Path
    lm_file: Path
    mimi_file: Path
    tokenizer_file: Path
    lm_config: dict | None  # LMModel kwargs; None: Moshi 7B's
    mimi_config: dict | None  # None: Mimi's published config
    model_type: str = "moshi"
    lora_file: Path | None = None
    raw_config: dict = field(default_factory=dict)

    def info(self):
        """The `moshi` package's own description of these files."""
        from moshi.models.loaders import CheckpointInfo

        return CheckpointInfo(self.lm_file, self.mimi_file, self.tokenizer_file, self.lm_config, self.raw_config or None,
                              self.mimi_config, self.model_type, self.lora_file)

    def identity(self) -> dict:
        """What a session's state depends on: the configs (a state moves only between engines
        whose identity is equal)."""
        return {"lm_config": self.lm_config, "mimi_config": self.mimi_config, "model_type": self.model_type}


@dataclass
class MoshiModels:
    """The loaded models: the LM, Mimi, the text tokenizer."""

    lm: Any  # moshi.models.LMModel
    mimi: Any  # moshi.models.MimiModel
    tokenizer: Any  # sentencepiece.SentencePieceProcessor
    checkpoint: MoshiCheckpoint


def read_checkpoint(path: str | Path) -> MoshiCheckpoint:
    """Check the directory at `path` (see the module docstring) without loading weights."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError("is not a checkpoint directory", root)
    raw: dict = {}
    cfg_file = root / "config.json"
    if cfg_file.exists():
        raw = _read_json(cfg_file)
    lm_config = {k: v for k, v in raw.items() if k not in FILE_KEYS} if raw else None
    lm_file = _file(root, raw.get("moshi_name", LM_NAME), "the LM weights", "moshi_name" not in raw)
    mimi_file = _file(root, raw.get("mimi_name", MIMI_NAME), "the Mimi weights", "mimi_name" not in raw)
    tok_file = _file(root, raw.get("tokenizer_name", TOKENIZER_NAME), "the text tokenizer", "tokenizer_name" not in raw)
    mimi_config = _read_json(_file(root, raw["mimi_config_name"], "the Mimi config")) if raw.get("mimi_config_name") else None
    lora = _file(root, raw["lora_name"], "the LoRA weights") if raw.get("lora_name") else None
    ckpt = MoshiCheckpoint(root, lm_file, mimi_file, tok_file, lm_config, mimi_config, raw.get("model_type", "moshi"), lora, raw)
    from moshi.models.loaders import get_mimi

    info = ckpt.info()
    text_card = _tokenizer_fits(ckpt)
    with torch.device("meta"):
        lm = info.get_moshi(device="meta", dtype=torch.float32, load_weight=False)
        mimi = get_mimi(None, ckpt.mimi_config, device="meta", num_codebooks=1)
    if text_card != lm.text_card:
        raise CheckpointError(f"text tokenizer has {text_card} pieces but the LM's text_card is {lm.text_card}", tok_file)
    if mimi.cardinality != lm.card:
        raise CheckpointError(f"Mimi has {mimi.cardinality} codes per codebook but the LM's card is {lm.card}", cfg_file)
    _same_tensors(lm_file, lm.state_dict(), "LM")
    _same_tensors(mimi_file, mimi.state_dict(), "Mimi")
    return ckpt


def load(path: str | Path | MoshiCheckpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MoshiModels:
    """Read, check and load a checkpoint: float32 on CPU, bfloat16 on CUDA unless `dtype`."""
    ckpt = path if isinstance(path, MoshiCheckpoint) else read_checkpoint(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = ckpt.info()
    lm = info.get_moshi(device=device, dtype=dtype).eval().requires_grad_(False)
    mimi = info.get_mimi(device=device).eval().requires_grad_(False)
    return MoshiModels(lm, mimi, info.get_text_tokenizer(), ckpt)


def _file(root: Path, name: Any, what: str, default: bool = False) -> Path:
    """`root / name`, which must be a file; `default`: no config.json named it."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"config.json names {what} as {name!r}", root / "config.json")
    path = root / name
    if not path.is_file():
        why = " (Kyutai's default name; a config.json may name another)" if default else ""
        raise CheckpointError(f"missing: {what}, {name}, is not in the checkpoint directory{why}", path)
    return path


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable JSON: {e}", path) from None
    if not isinstance(data, dict):
        raise CheckpointError("must hold a JSON object", path)
    return data


def _tokenizer_fits(ckpt: MoshiCheckpoint) -> int:
    """-> the tokenizer's vocabulary size; an unreadable model is a CheckpointError."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt.tokenizer_file))
        return sp.vocab_size()
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"unreadable SentencePiece model: {e}", ckpt.tokenizer_file) from None


def _same_tensors(path: Path, expected: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor the model expects is in the file at its shape, and nothing else is."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"unreadable safetensors file: {e}", path) from None
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{what} weights do not match the config: missing {missing[:5]}, unexpected {extra[:5]}"
                              f" ({len(missing)} missing, {len(extra)} unexpected)", path)
    for k, t in expected.items():
        if shapes[k] != tuple(t.shape):
            raise CheckpointError(f"{what} tensor {k!r} has shape {list(shapes[k])}, the config makes {list(t.shape)}", path)
