"""A tiny Llama-shaped model directory, generated here: nothing is downloaded.

`write_model_dir(path)` writes what vLLM (and transformers) need to serve a model with
`load_format="dummy"` (random weights, so no weight files): `config.json` (LlamaForCausalLM,
2 layers, head size 32, which vLLM's CPU attention supports), a byte-level BPE tokenizer trained
with the `tokenizers` library on a small built-in corpus (`tokenizer.json`), `tokenizer_config.json`
with a ChatML chat template that renders `tools` and assistant `tool_calls`, and
`generation_config.json`. The directory is the pool's default model and the tests' model; its
output is noise, but structured output (JSON schema) still makes every reply parse.

`default_model_dir()` is where the default one lives (~/.cache/interplay/tiny-llama, or
$INTERPLAY_MODEL_CACHE), written on first use.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

VERSION = 1  # bump when the files change; a directory of another version is rewritten
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
VOCAB_SIZE = 2048  # the most the tokenizer may learn

# transformers renders templates with trim_blocks, so newlines are written as {{ nl }}.
CHAT_TEMPLATE = (
    "{%- set nl = '\\n' %}"
    "{%- if messages and messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set rest = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}"
    "{%- if system or tools %}<|im_start|>system{{ nl }}{{ system }}"
    "{%- if tools %}{{ nl }}# Tools{%- for tool in tools %}{{ nl }}{{ tool | tojson }}{%- endfor %}{%- endif %}<|im_end|>{{ nl }}{%- endif %}"
    "{%- for m in rest %}<|im_start|>{{ m.role }}{{ nl }}"
    "{%- if m.content is string %}{{ m.content }}"
    "{%- elif m.content %}{%- for part in m.content %}{%- if part.type == 'text' %}{{ part.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if m.tool_calls %}{%- for call in m.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{%- endfor %}{%- endif %}"
    "<|im_end|>{{ nl }}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{{ nl }}{%- endif %}"
)

CORPUS = """
The user asked a question and the assistant answered. What time is it? It is twelve o'clock.
Set a timer for five minutes. Calculate two plus two times three. The weather is sunny today.
{"tool": "clock", "arguments": {}} {"answer": "The result is 42.", "contradicts": false}
{"name": "calculator", "arguments": {"expression": "(1 + 2) * 3 / 4 - 5 ** 2"}} true false null
def main(): print(sum(range(10))) import math; return math.sqrt(16) [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
system user assistant tool tools function call result error cancelled progress partial final
Hello, can you hear me? Yes, I can hear you. Let me check that for you. One moment please.
"""


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 64, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def write_model_dir(path: str | os.PathLike) -> Path:
    """Write the model directory at `path` (created if missing) and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_json()
    vocab_size = len(json.loads(tokenizer)["model"]["vocab"])  # the specials are in it
    ids = {t: i for i, t in enumerate(SPECIALS)}  # trained first, so they hold ids 0..5
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "vocab_size": vocab_size, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|end_of_text|>"],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>", "pad_token": "<|end_of_text|>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"]}
    files = {
        "config.json": json.dumps(config, indent=2),
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps({k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token")}),
        "generation_config.json": json.dumps(generation, indent=2),
        "interplay_model_dir.json": json.dumps({"version": VERSION}),
    }
    for name, text in files.items():  # each file whole or not at all: readers may race the writer
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path / name)
    return path


def default_model_dir() -> Path:
    """The generated model directory, written once per cache (and again when VERSION changes)."""
    root = Path(os.environ.get("INTERPLAY_MODEL_CACHE", Path.home() / ".cache" / "interplay"))
    path = root / "tiny-llama"
    try:
        if json.loads((path / "interplay_model_dir.json").read_text()).get("version") == VERSION:
            return path
    except (OSError, ValueError):
        pass
    return write_model_dir(path)
