"""Speech to text as production runs it: PocketSphinx in the pool's driver (the default), and a
Whisper deployment of Ray Serve LLM (the whisper engine; here the generated tiny Whisper with
dummy weights, served by vLLM's CPU build), both through the `Transcriber` port."""

import asyncio
import io
import pickle
import shutil
import subprocess
import wave

import numpy as np
import pytest

from actors.background.context import Transcripts, render
from actors.log.session_log import SessionLog
from actors.background.transcribe import PocketSphinxTranscriber, ServedTranscriber, Transcriber, default_whisper_dir, wav_bytes, write_whisper_dir
from protocols import BackgroundTask, InputChunk

PHRASE = "what is the weather like tomorrow"  # espeak-ng's en-us voice, which PocketSphinx's US model hears best


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_whisper_dir(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> np.ndarray:
    """PHRASE spoken by espeak-ng, as 16 kHz mono int16 (resampled by sox, else PyAV)."""
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (make system-deps)")
    from examples.call import read_wav, resample

    folder = tmp_path_factory.mktemp("spoken")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(folder / "raw.wav"), PHRASE], check=True)
    if shutil.which("sox"):
        subprocess.run(["sox", str(folder / "raw.wav"), "-r", "16000", "-c", "1", "-b", "16", str(folder / "16k.wav")], check=True)
        samples, rate = read_wav(str(folder / "16k.wav"))
        return samples
    samples, rate = read_wav(str(folder / "raw.wav"))
    return resample(samples, rate, 16000)


def _heard(text: str) -> set[str]:
    return set(text.lower().split()) & set(PHRASE.split())


def test_wav_bytes_are_16k_mono_int16():
    audio = np.arange(-800, 800, dtype=np.int16)
    with wave.open(io.BytesIO(wav_bytes(audio))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), np.int16), audio)
    with pytest.raises(ValueError, match="int16"):
        wav_bytes(audio.astype(np.float32))


# --- PocketSphinx (the default engine) -------------------------------------------------------------


def test_pocketsphinx_hears_espeak_speech_as_words(spoken):
    transcriber = PocketSphinxTranscriber()
    assert isinstance(transcriber, Transcriber)

    async def scenario():
        try:
            return await transcriber.transcribe(spoken)
        finally:
            await transcriber.aclose()

    text = asyncio.run(scenario())
    assert "weather" in text.split() and len(_heard(text)) >= 4, text


def test_pocketsphinx_gives_nothing_for_no_speech_and_refuses_what_is_not_16k_int16_mono(spoken):
    transcriber = PocketSphinxTranscriber()

    async def scenario():
        try:
            empty = [await transcriber.transcribe(np.zeros(n, np.int16)) for n in (0, 1, 160, 3200)]
            for bad in (spoken.astype(np.float32), np.stack([spoken, spoken]), np.int16(5)):
                with pytest.raises(ValueError, match="1-D int16 at 16000 Hz"):
                    await transcriber.transcribe(bad)
            return empty, await transcriber.transcribe(spoken)
        finally:
            await transcriber.aclose()

    empty, after = asyncio.run(scenario())
    assert empty == ["", "", "", ""]
    assert "weather" in after.split()  # the decoder is fine after all that


def test_pocketsphinx_decodes_off_the_event_loop_one_request_at_a_time(spoken):
    """Eight transcriptions at once (a decoder is not thread-safe) each give the text one alone
    gives; while a long run decodes, the caller's event loop keeps turning (PocketSphinx holds the
    GIL while it decodes: in a thread of this process the loop would stand still); a request
    cancelled midway does not answer the next one; a decoding process that dies is replaced."""
    transcriber = PocketSphinxTranscriber()
    long = np.tile(spoken, 8)

    async def scenario():
        try:
            alone = await transcriber.transcribe(spoken)
            together = await asyncio.gather(*(transcriber.transcribe(spoken) for _ in range(8)))
            decoding, turns = asyncio.ensure_future(transcriber.transcribe(long)), 0
            while not decoding.done():
                await asyncio.sleep(0.005)
                turns += 1
            await decoding
            cancelled = asyncio.ensure_future(transcriber.transcribe(long))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            after_cancel = await transcriber.transcribe(spoken)
            transcriber._proc.kill()
            await transcriber._proc.wait()
            after_kill = await transcriber.transcribe(spoken)
            return alone, together, turns, after_cancel, after_kill
        finally:
            await transcriber.aclose()

    alone, together, turns, after_cancel, after_kill = asyncio.run(scenario())
    assert "weather" in alone.split() and together == [alone] * 8
    assert turns >= 10, turns
    assert after_cancel == alone and after_kill == alone


def test_pocketsphinx_travels_to_an_actor_and_its_text_is_the_users_message(spoken, tmp_path):
    """Pickled (as it is sent to the pool's driver) after use, it still transcribes; rendered from
    the log, the user's speech is its transcript."""
    used = PocketSphinxTranscriber()

    async def use():
        await used.transcribe(spoken[:1600])
        await used.aclose()

    asyncio.run(use())
    transcriber = pickle.loads(pickle.dumps(used))
    chunks = np.concatenate([spoken, np.zeros(16000, np.int16)])  # then a second of quiet
    n = len(chunks) // 3200
    log = SessionLog(str(tmp_path), object_store=False)
    token = log.open("s")
    log.append([InputChunk("s", k, k * 0.2, chunks[k * 3200 : (k + 1) * 3200]) for k in range(n)])
    task = BackgroundTask("s", 1.0, "delegate", "help", context_upto=n - 1, log_token=token)

    async def scenario():
        try:
            return await render(task, log, speech=Transcripts(transcriber), system=None)
        finally:
            await transcriber.aclose()

    messages = asyncio.run(scenario())
    assert messages[0]["role"] == "user" and "weather" in messages[0]["content"].split(), messages


# --- Whisper served by Ray Serve LLM (the whisper engine) ---------------------------------------------


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
def test_the_whisper_deployment_transcribes_through_serve_and_its_text_reaches_the_context(app, tmp_path):
    """The whisper engine's path: `deploy` starts the Whisper application (the generated tiny
    Whisper, dummy weights) beside nothing else here; until it runs, `ServedTranscriber` by name
    answers a clear error; then its transcript of the user's speech is the user's message in a
    task's context, as the pool's driver renders it."""
    pytest.importorskip("vllm")
    import ray
    from ray import serve

    from deployments.config import BackgroundSection
    from deployments.pool import build_app, speech_model

    section = BackgroundSection(speech={"engine": "whisper"})
    name = "interplay-test-speech"
    by_name = ServedTranscriber(None, section.speech.model_id, app_name=name)
    voice = (3000 * np.sin(np.arange(3 * 3200) * 0.07)).astype(np.int16)
    with pytest.raises(RuntimeError, match=f"the speech deployment \\({name}\\) is not up: not deployed"):
        asyncio.run(by_name.transcribe(voice))
    handle = serve.run(build_app(section, speech_model(section), ray.cluster_resources()), name=name, route_prefix=None)
    try:
        log = SessionLog(str(tmp_path), object_store=False)
        token = log.open("s")
        log.append([InputChunk("s", k, k * 0.2, voice[k * 3200 : (k + 1) * 3200]) for k in range(3)])

        async def scenario():
            direct = await ServedTranscriber(handle, section.speech.model_id).transcribe(voice)
            found = await by_name.transcribe(voice)
            task = BackgroundTask("s", 1.0, "delegate", "help", context_upto=2, log_token=token)
            messages = await render(task, log, speech=Transcripts(by_name), system=None)
            return direct, found, messages

        direct, found, messages = asyncio.run(scenario())
    finally:
        serve.delete(name)
    assert isinstance(direct, str) and direct.strip()  # random weights: some text, not words
    assert found == direct and messages[0] == {"role": "user", "content": direct.strip()}
