"""Speech to text for the background model: the `Transcriber` port and its implementations.

`await transcriber.transcribe(audio)` takes one stretch of the user's speech (1-D int16, 16 kHz
mono, as the log stores it) and returns its text ("" for none); anything else is a ValueError.

- `PocketSphinxTranscriber()` (the default): CMU PocketSphinx with the US English acoustic model,
  dictionary and language model its PyPI package ships (nothing is fetched), decoding in a child
  process, one run at a time, so the caller's event loop never waits on it.
- `ServedTranscriber(handle)`: a Whisper model served like the pool, by Ray Serve LLM
  (`build_llm_deployment(LLMConfig(model_loading_config={"model_source": <whisper dir>}))`);
  it calls the deployment's `transcriptions` (vLLM's own OpenAI transcription serving).

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
import sys
import tempfile
import wave
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000


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


class PocketSphinxTranscriber:
    """PocketSphinx with its packaged English model, decoding whole runs (its batch normalisation
    hears better than feeding it pieces). Decodes run in a child process (`python -c
    SPHINX_WORKER`, started on first use: about a second, the model's load included), one at a
    time: a decoder is not thread-safe, and it holds the GIL while it decodes, so in a thread it
    would stall the caller's event loop (the pool driver's every task) for the whole decode. A
    child that dies is replaced at the next call; the call it took down fails with a RuntimeError."""

    def __init__(self, **config: Any):
        self.config = {"loglevel": "FATAL", **config}  # pocketsphinx.Config keys (hmm, lm, dict, ...)
        self._proc: asyncio.subprocess.Process | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    def __getstate__(self) -> dict:  # sent to an actor: its child is started there
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["config"])

    async def transcribe(self, audio: np.ndarray) -> str:
        audio = _check(audio)
        if audio.size == 0:
            return ""
        lock = self._lock
        if self._loop is not asyncio.get_running_loop() or lock is None:  # a child and a lock belong to one event loop
            self.close()
            self._loop, lock = asyncio.get_running_loop(), asyncio.Lock()
            self._lock = lock
        async with lock:
            proc = self._proc
            if proc is None or proc.returncode is not None:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", SPHINX_WORKER, json.dumps(self.config), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )
            stdin, stdout = proc.stdin, proc.stdout
            assert stdin is not None and stdout is not None  # both were asked for as pipes
            raw = audio.astype("<i2", copy=False).tobytes()
            try:
                stdin.write(len(raw).to_bytes(8, "little") + raw)
                await stdin.drain()
                reply = json.loads(await stdout.readline() or b"null")
            except ConnectionError:
                reply = None
            except BaseException:  # cancelled mid-request: its reply must not answer the next one
                self.close()
                raise
            if reply is None:
                self.close()
                raise RuntimeError("speech recognition failed: its process ended (a new one starts at the next call)")
            if "error" in reply:
                raise RuntimeError(f"speech recognition failed: {reply['error']}")
            return reply["text"]

    def close(self) -> None:
        """End the child process now (it also ends when its caller does: its input closes)."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except ProcessLookupError:
                pass
        self._proc = None

    async def aclose(self) -> None:
        """End the child process and wait for it, in the event loop it was started from."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # it ends at the end of its input
            await proc.wait()


# The decoding process: reads (8-byte length, int16 samples) requests on stdin, writes one JSON
# line per request ({"text": ...} or {"error": ...}) on stdout, until its input closes.
SPHINX_WORKER = r"""
import json, sys
from pocketsphinx import Decoder
config = json.loads(sys.argv[1])
decoder = Decoder(**config)
source, sink = sys.stdin.buffer, sys.stdout.buffer
while len(head := source.read(8)) == 8:
    raw = source.read(int.from_bytes(head, "little"))
    try:
        decoder.start_utt()
        decoder.process_raw(raw, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        reply = {"text": hyp.hypstr.strip() if hyp is not None else ""}
    except Exception as exc:
        decoder = Decoder(**config)  # it may be left mid-utterance: a fresh one
        reply = {"error": f"{type(exc).__name__}: {exc}"}
    sink.write(json.dumps(reply).encode() + b"\n")
    sink.flush()
"""


class ServedTranscriber:
    """A Whisper deployment of Ray Serve LLM, through its handle (`LLMServer.transcriptions`).
    `handle=None`: the Serve application `app_name`'s, looked up at first use."""

    def __init__(self, handle: Any, model: str | None = None, *, language: str = "en", app_name: str | None = None):
        self.handle: Any = handle  # a Serve handle (its streaming `.remote` is untyped) or a test double
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
        if self.handle is None:  # deployed apart: answer clearly until it runs
            from ray import serve

            if self.app_name is None:
                raise RuntimeError("no speech handle, and no app_name to look one up by")
            state = await asyncio.to_thread(app_status, self.app_name)
            if state != "RUNNING":
                raise RuntimeError(f"the speech deployment ({self.app_name}) is not up: {(state or 'not deployed').lower()}")
            self.handle = serve.get_app_handle(self.app_name)
        text = []
        async for out in self.handle.options(stream=True).transcriptions.remote(request):
            for item in out if isinstance(out, list) else [out]:
                error = getattr(item, "error", None)
                if error is not None:
                    raise RuntimeError(f"transcription failed: {getattr(error, 'message', error)}")
                text.append(getattr(item, "text", None) or "")
        return "".join(text).strip()


def app_status(name: str) -> str | None:
    """The Serve application `name`'s status ("RUNNING", "DEPLOYING", ...), or None if there is none."""
    from ray import serve

    app = serve.status().applications.get(name)
    return str(app.status.value if hasattr(app.status, "value") else app.status) if app is not None else None


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
