"""Shared by the training tests: a voice synthesizer with its own cache, one per test module."""

from __future__ import annotations

import pytest

from training.voices import Synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return Synth(tmp_path_factory.mktemp("cache"))
