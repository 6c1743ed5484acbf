"""A checkpoint directory that cannot be served says which file is at fault, and why."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.moshi.checkpoint import CheckpointError, read_checkpoint


@pytest.fixture
def ckpt(moshi_dir, tmp_path):
    return shutil.copytree(moshi_dir, tmp_path / "ckpt")


def test_a_good_checkpoint_reads(ckpt):
    c = read_checkpoint(ckpt)
    assert c.lm_file.name == "model.safetensors" and c.mimi_config is not None and c.model_type == "moshi"


@pytest.mark.parametrize("name", ["model.safetensors", "mimi.safetensors", "tokenizer.model", "mimi_config.json"])
def test_a_missing_file_is_named(ckpt, name):
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name == name and isinstance(e.value, ValueError)


def test_without_a_config_it_expects_kyutais_default_names(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name in ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors")


def test_a_tensor_at_another_shape_is_named(ckpt):
    state = load_file(str(ckpt / "model.safetensors"))
    state["text_linear.weight"] = torch.zeros(7, 3)
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="text_linear.weight") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name == "model.safetensors"


def test_weights_of_another_config_are_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_layers"] += 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name == "model.safetensors"


@pytest.mark.parametrize("damage", ["tokenizer", "weights", "config"])
def test_unreadable_files_are_named(ckpt, damage):
    name = {"tokenizer": "tokenizer.model", "weights": "mimi.safetensors", "config": "config.json"}[damage]
    (ckpt / name).write_bytes(b"not what it should be")
    with pytest.raises(CheckpointError, match="unreadable") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name == name


def test_a_tokenizer_that_does_not_fit_the_lm_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_card"] += 5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="text_card") as e:
        read_checkpoint(ckpt)
    assert e.value.path.name == "tokenizer.model"


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_checkpoint(tmp_path / "nowhere")


def test_building_an_engine_on_another_directory_says_what_is_missing_and_where_checkpoints_come_from(tmp_path):
    from models.moshi.engine import MoshiEngine

    (tmp_path / "weights.pt").write_bytes(b"some other model")
    with pytest.raises(CheckpointError) as e:
        MoshiEngine(tmp_path)
    message = str(e.value)
    assert e.value.path == tmp_path / "model.safetensors" and "missing: the LM weights, model.safetensors," in message
    assert "default name" in message and "kyutai/moshiko-pytorch-bf16" in message
    assert all(name in message for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model"))
    assert "python -m models.moshi.random_checkpoint DIR" in message
