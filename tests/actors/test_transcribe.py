"""Speech to text: a generated tiny Whisper directory served by vLLM (dummy weights), and the port."""

import asyncio
import io
import wave

import numpy as np
import pytest

from actors.context import Transcripts, render
from actors.session_log import SessionLog
from actors.transcribe import Transcriber, WhisperEngine, default_whisper_dir, wav_bytes, write_whisper_dir
from protocols import BackgroundTask, InputChunk


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_whisper_dir(tmp_path_factory.mktemp("whisper"))


def test_wav_bytes_are_16k_mono_int16():
    audio = np.arange(-800, 800, dtype=np.int16)
    with wave.open(io.BytesIO(wav_bytes(audio))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), np.int16), audio)
    with pytest.raises(ValueError, match="int16"):
        wav_bytes(audio.astype(np.float32))


def test_the_generated_directory_is_a_whisper_model_to_transformers(whisper_dir):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(whisper_dir)
    config = AutoConfig.from_pretrained(whisper_dir)
    tok = processor.tokenizer
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert len(set(prompt)) == 4 and all(0 <= i < config.vocab_size for i in prompt)
    assert config.decoder_start_token_id == prompt[0]
    features = processor.feature_extractor(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="np").input_features
    assert features.shape == (1, config.num_mel_bins, 2 * config.max_source_positions)  # 30 s of frames
    assert tok.decode(tok("hello there").input_ids, skip_special_tokens=True) == "hello there"


def test_the_speech_deployments_default_directory_is_written_once(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("INTERPLAY_MODEL_CACHE", str(tmp_path))
    path = default_whisper_dir()
    assert path == tmp_path / "tiny-whisper" and (path / "config.json").exists()
    written = (path / "config.json").stat().st_mtime_ns
    assert default_whisper_dir() == path and (path / "config.json").stat().st_mtime_ns == written


@pytest.mark.slow
def test_vllm_serves_the_tiny_whisper_and_its_text_reaches_the_context(whisper_dir, tmp_path, monkeypatch):
    """vLLM (CPU build here) runs the generated Whisper with dummy weights; its transcript of the
    user's speech is the user's message in a task's context."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    engine = WhisperEngine(whisper_dir, load_format="dummy", gpu_memory_utilization=0.1, max_tokens=16)
    assert isinstance(engine, Transcriber)
    voice = (3000 * np.sin(np.arange(3 * 3200) * 0.07)).astype(np.int16)
    log = SessionLog(str(tmp_path), object_store=False)
    token = log.open("s")
    log.append([InputChunk("s", k, k * 0.2, voice[k * 3200 : (k + 1) * 3200]) for k in range(3)])

    async def scenario():
        direct = await engine.transcribe(voice)
        messages = await render(BackgroundTask("s", 1.0, "delegate", "help", context_upto=2, log_token=token), log, speech=Transcripts(engine), system=None)
        return direct, messages

    try:
        direct, messages = asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert isinstance(direct, str) and direct.strip()  # random weights: some text, not words
    assert messages[0] == {"role": "user", "content": direct.strip()}
