"""Shared by the training tests, one of each per test module: a voice synthesizer with its own cache,
and a tiny training set."""

from __future__ import annotations

import pytest

from models.config import InteractionConfig
from training.generate import generate_set
from training.script import DialogueConfig
from training.voices import Synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return Synth(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Two training dialogues at the tiny model's shapes."""
    root = tmp_path_factory.mktemp("synth")
    cfg = DialogueConfig.from_model(InteractionConfig.preset("tiny"))
    generate_set(root, 2, 0, cfg=cfg, cache_dir=root / "cache", workers=0, progress=None)
    return root
