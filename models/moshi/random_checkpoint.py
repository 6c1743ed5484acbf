"""`python -m models.moshi.random_checkpoint DIR`: a Moshi-family checkpoint with random weights.

It builds the reference model from the `moshi` package (its `LMModel` and `MimiModel`) at a
small configuration and writes it in Kyutai's layout, so `models.moshi.checkpoint` loads it as it
loads `kyutai/moshiko-pytorch-bf16`: `config.json` (the LM's kwargs plus the file names, with
`mimi_config_name` pointing at the Mimi config, as Kyutai's loader reads it), the LM safetensors,
the Mimi safetensors and a SentencePiece model trained here from generated text (nothing is
downloaded). `small` runs a tick in real time on two CPU cores; `gpu` is a larger shape for the
CUDA test and bench. The LM's `context` is short on purpose, so sessions past it are quick to test.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

LM_NAME, MIMI_NAME = "model.safetensors", "mimi.safetensors"
TOKENIZER_NAME, MIMI_CONFIG_NAME = "tokenizer.model", "mimi_config.json"


def mimi_config(dim: int = 64, filters: int = 8, layers: int = 1, n_q: int = 4, bins: int = 256) -> dict:
    """Mimi's config at reduced width; the strides (24 kHz, 12.5 Hz frames) are the real ones."""
    seanet = {
        "channels": 1, "dimension": dim, "causal": True, "n_filters": filters, "n_residual_layers": 1,
        "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
        "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
        "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
    }
    transformer = {
        "d_model": dim, "num_heads": 4, "num_layers": layers, "causal": True, "layer_scale": 0.01,
        "context": 50, "conv_layout": True, "max_period": 10000, "gating": "none", "norm": "layer_norm",
        "positional_embedding": "rope", "dim_feedforward": 2 * dim, "input_dimension": dim, "output_dimensions": [dim],
    }
    quantizer = {"dimension": 32, "n_q": n_q, "bins": bins, "input_dimension": dim, "output_dimension": dim}
    return {"sample_rate": 24000, "channels": 1, "frame_rate": 12.5, "seanet": seanet, "quantizer": quantizer, "transformer": transformer}


def lm_config(text_card: int, card: int = 256, dim: int = 96, layers: int = 2, dep_q: int = 2, context: int = 32,
              dep_dim: int = 64, dep_layers: int = 1) -> dict:
    """LMModel kwargs in Moshi's layout: one text stream, `dep_q` model and `dep_q` user audio
    codebooks (delays 0 then 1, as Moshi's), a depformer over the model's codebooks."""
    return {
        "dim": dim, "text_card": text_card, "existing_text_padding_id": 3, "n_q": 2 * dep_q, "dep_q": dep_q,
        "card": card, "num_heads": 4, "num_layers": layers, "hidden_scale": 4.125, "causal": True,
        "layer_scale": None, "context": context, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": dep_dim, "depformer_dim_feedforward": int(4.125 * dep_dim),
        "depformer_num_heads": 4, "depformer_num_layers": dep_layers, "depformer_layer_scale": None,
        "depformer_multi_linear": True, "depformer_context": dep_q, "depformer_max_period": 10000,
        "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
        "delays": [0] + [0] + [1] * (dep_q - 1) + [0] + [1] * (dep_q - 1),
    }


PRESETS = {
    "small": dict(lm={}, mimi={}),
    "gpu": dict(lm=dict(dim=1024, layers=8, dep_q=8, context=375, dep_dim=512, dep_layers=4, card=2048),
                mimi=dict(dim=256, filters=32, layers=4, n_q=8, bins=2048)),
}

WORDS = ("hello there how are you doing today I am fine thanks what time is it the weather is nice "
         "let me think about that sure go ahead sorry could you repeat okay right yes no maybe").split()


def train_tokenizer(path: Path, vocab_size: int = 200, seed: int = 0) -> int:
    """A SentencePiece model trained on generated sentences; ids 0-3 are unk, bos, eos and pad
    (3 is the padding token Moshi's text stream uses). -> its vocabulary size."""
    import sentencepiece as spm

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        syllables = [a + b for a in "bdgklmnprstvz" for b in "aeiou"]
        words = list(WORDS) + ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(300)]
        text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)))
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(Path(tmp) / "spm"), vocab_size=vocab_size, model_type="unigram",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2, num_threads=1, hard_vocab_limit=False,
        )
        path.write_bytes((Path(tmp) / "spm.model").read_bytes())
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def _spread_codebooks(mimi) -> None:
    """Mimi's codebooks start empty (all zero: every frame would be code 0). Draw them at the
    scale of the projected latents of some tones and noise, so codes follow the input."""
    t = torch.arange(24_000 * 2) / 24_000
    audio = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) + 0.05 * torch.randn_like(t) for f in (110, 220, 440, 880)])
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(audio[:, None])  # (4, dim, frames)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            scale = rvq.input_proj(latent).std().item()
            for i, layer in enumerate(rvq.vq.layers):
                book = layer._codebook
                book.embedding_sum.copy_(torch.randn_like(book.embedding_sum) * scale / (2 ** i))
                book.cluster_usage.fill_(1.0)
                book._initialized.fill_(1.0)


def write_checkpoint(out: str | Path, preset: str = "small", seed: int = 0) -> Path:
    """Build the reference LM and Mimi at `preset` with weights drawn from `seed`; save them."""
    from moshi.models.loaders import get_mimi, get_moshi_lm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(out / TOKENIZER_NAME, seed=seed)
    shapes = PRESETS[preset]
    mcfg = mimi_config(**shapes["mimi"])
    lcfg = lm_config(text_card=vocab, **{"card": mcfg["quantizer"]["bins"], **shapes["lm"]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = get_moshi_lm(None, lm_kwargs=lcfg, device="cpu", dtype=torch.float32)
        mimi = get_mimi(None, mcfg, device="cpu", num_codebooks=lcfg["dep_q"])
        _spread_codebooks(mimi)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / LM_NAME))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / MIMI_NAME))
    (out / MIMI_CONFIG_NAME).write_text(json.dumps(mcfg, indent=1))
    config = {**lcfg, "moshi_name": LM_NAME, "mimi_name": MIMI_NAME, "tokenizer_name": TOKENIZER_NAME,
              "mimi_config_name": MIMI_CONFIG_NAME, "model_type": "moshi"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(write_checkpoint(args.dir, args.preset, args.seed))


if __name__ == "__main__":
    main()
