"""Speech for synthetic dialogues: espeak-ng in many voices, 16 kHz int16, with word timings.

`Synth.render(text, voice)` returns a `Speech`: the audio (leading and trailing silence trimmed
to `PAD_S`) and each word's start and end in seconds, taken from espeak-ng's word events (word
starts) and the audio's energy (word ends). Renders are cached on disk as .npz files keyed by
the text, the voice and `VERSION`, so a phrase is synthesised once; rendering is deterministic.
`VoicePool` names the user voices (espeak language x variant) and splits them into disjoint
training and held-out sets; `MODEL_VOICE` is the model's one fixed voice.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pickle
import random
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
VERSION = 1  # bump when rendering changes, so cached phrases are not reused
PAD_S = 0.02  # silence kept before the first and after the last voiced sample
DEFAULT_CACHE = Path("data/cache")


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: language voice, variant, words per minute, pitch and pitch range (0-99)."""

    base: str = "en-us"
    variant: str | None = None
    rate: int = 165
    pitch: int = 50
    range: int = 50

    @property
    def name(self) -> str:
        return self.base if self.variant is None else f"{self.base}+{self.variant}"

    @property
    def timbre(self) -> str:
        """What the train / held-out split keeps disjoint."""
        return self.name

    def to_dict(self) -> dict:
        return asdict(self)


# The model speaks in one voice, a little slower than espeak's default so its transcript fits
# the text head's bytes per tick (about 13 characters a second against 4 bytes per 200 ms).
MODEL_VOICE = Voice("en-us", None, rate=150, pitch=45, range=40)

BASES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
# Variants that stay intelligible, voiced speech (no whisper, croak or robots), so VAD hears them.
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "adam", "alicia", "andrea", "andy", "annie", "antonio",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "gene", "grandma",
    "grandpa", "gustave", "iven", "iven3", "john", "linda", "marcelo", "max", "michel", "norbert",
    "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph", "travis",
    "victor", "zac",
)
HELDOUT_VARIANTS = ("f4", "m6", "klatt3", "annie", "david", "linda", "norbert", "steph", "travis")


class VoicePool:
    """User voices for one split: timbres (base+variant) and ranges of rate and pitch.
    The held-out timbres use variants never heard in training, and no split has the model's voice."""

    def __init__(self, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        variants = [v for v in VARIANTS if (v in HELDOUT_VARIANTS) == (split == "heldout")]
        self.split = split
        self.timbres = [(b, v) for b in BASES for v in variants]

    def sample(self, rng: random.Random) -> Voice:
        base, variant = rng.choice(self.timbres)
        return Voice(base, variant, rate=rng.randint(135, 205), pitch=rng.randint(25, 80), range=rng.randint(30, 90))


@dataclass
class Speech:
    audio: np.ndarray  # (S,) int16, 16 kHz
    words: list[tuple[str, float, float]]  # (word, start_s, end_s) within `audio`

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def start(self) -> float:
        """First voiced 10 ms frame, in seconds."""
        v = voiced_mask(self.audio)
        return float(np.argmax(v)) / 100 if v.any() else 0.0

    @property
    def end(self) -> float:
        """End of the last voiced 10 ms frame, in seconds."""
        v = voiced_mask(self.audio)
        return float(len(v) - np.argmax(v[::-1])) / 100 if v.any() else 0.0


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
_EVENT_WORD, _SYNCHRONOUS, _POS_CHARACTER, _CHARS_UTF8 = 1, 2, 1, 1
_RATE, _PITCH, _RANGE = 1, 3, 4


class _Espeak:
    """libespeak-ng through ctypes: one per process (`_ESPEAK`), as the library is global state."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libespeak-ng.so.1")
        self.rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, None, 0)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._words: list[tuple[int, int, int]] = []  # (char offset, length, sample)
        self._cb = _CALLBACK(self._collect)  # kept alive: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._cb)

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:
            e = events[i]
            if e.type == _EVENT_WORD and e.length > 0:
                self._words.append((e.text_position - 1, e.length, e.sample))
            i += 1
        return 0

    def synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """-> int16 audio at self.rate, [(word, start sample)].

        espeak-ng carries state from one utterance to the next (the same phrase comes out a few
        samples different each time), so every phrase is synthesised in a forked child of this
        never-used instance: each render starts from the same state and is reproducible."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: synthesise, send, exit without running the parent's cleanup
            code = 1
            try:
                with os.fdopen(w, "wb") as f:
                    pickle.dump(self._synth(text, voice), f)
                code = 0
            except BaseException:
                os.write(2, traceback.format_exc().encode())
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not payload:
            raise RuntimeError(f"espeak-ng failed on {text!r} in {voice.name}")
        return pickle.loads(payload)

    def _synth(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[str, int]]]:
        if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self._chunks, self._words = [], []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(ctypes.c_char_p(data), len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        # Event positions count characters; map them back through the UTF-8 text.
        words = [(data.decode("utf-8", "replace")[off:off + n], s) for off, n, s in self._words]
        return audio.astype(np.int16), words


_ESPEAK: _Espeak | None = None


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by FFT (zero-padded so the ends do not wrap): float in, float out."""
    if src == dst or len(x) == 0:
        return x.astype(np.float64)
    pad = src // 10
    xp = np.concatenate([np.zeros(pad), x, np.zeros(pad)])
    n_out = int(round(len(xp) * dst / src))
    spec = np.fft.rfft(xp)
    keep = n_out // 2 + 1
    out_spec = np.zeros(keep, dtype=complex)
    m = min(keep, len(spec))
    out_spec[:m] = spec[:m]
    y = np.fft.irfft(out_spec, n_out) * (n_out / len(xp))
    cut = int(round(pad * dst / src))
    return y[cut: cut + int(round(len(x) * dst / src))]


def voiced_mask(audio: np.ndarray, frame: int = 160, floor_db: float = -40.0) -> np.ndarray:
    """Per 10 ms frame: RMS within floor_db of the loudest frame."""
    n = len(audio) // frame
    if n == 0:
        return np.zeros(0, bool)
    x = audio[: n * frame].astype(np.float64).reshape(n, frame)
    rms = np.sqrt((x * x).mean(1)) + 1e-9
    return 20 * np.log10(rms / rms.max()) > floor_db


class Synth:
    """Renders phrases to `Speech`, through an on-disk cache (`cache_dir`, None for none)."""

    def __init__(self, cache_dir: str | os.PathLike | None = DEFAULT_CACHE):
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / "tts"
        self._espeak: _Espeak | None = None
        self.rendered = 0  # phrases synthesised (cache misses), for progress reports

    def render(self, text: str, voice: Voice) -> Speech:
        key = hashlib.sha1(json.dumps([VERSION, text, voice.to_dict()], sort_keys=True).encode()).hexdigest()
        path = None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.npz"
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return Speech(z["audio"], [(w, float(a), float(b)) for w, a, b in zip(z["words"].tolist(), z["starts"], z["ends"])])
            except (OSError, ValueError, KeyError):
                pass  # a torn or stale file: render again
        speech = self._render(text, voice)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, audio=speech.audio, words=np.array([w for w, _, _ in speech.words], dtype=str),
                         starts=np.array([a for _, a, _ in speech.words]), ends=np.array([b for _, _, b in speech.words]))
            os.replace(tmp, path)  # atomic: parallel workers never read half a file
        return speech

    def _render(self, text: str, voice: Voice) -> Speech:
        global _ESPEAK
        if _ESPEAK is None:
            _ESPEAK = _Espeak()
        self._espeak = _ESPEAK
        self.rendered += 1
        raw, words = self._espeak.synth(text, voice)
        src = self._espeak.rate
        audio = resample(raw.astype(np.float64), src, SAMPLE_RATE)
        voiced = voiced_mask(audio)
        if not voiced.any():
            raise ValueError(f"espeak-ng rendered no speech for {text!r} in {voice.name}")
        frame = 160
        first, last = int(np.argmax(voiced)), len(voiced) - 1 - int(np.argmax(voiced[::-1]))
        pad = int(PAD_S * SAMPLE_RATE)
        lo, hi = max(0, first * frame - pad), min(len(audio), (last + 1) * frame + pad)
        audio = audio[lo:hi]
        voiced = voiced_mask(audio)
        starts = [max(0.0, s * SAMPLE_RATE / src - lo) / SAMPLE_RATE for _, s in words]
        ends = []
        for i, st in enumerate(starts):
            nxt = starts[i + 1] if i + 1 < len(starts) else len(audio) / SAMPLE_RATE
            a, b = int(st * 100), max(int(st * 100) + 1, int(nxt * 100))
            seg = voiced[a:b]
            ends.append((a + len(seg) - int(np.argmax(seg[::-1]))) / 100 if seg.any() else min(nxt, st + 0.05))
        starts[0] = min(starts[0], PAD_S) if starts else 0.0
        pcm = np.clip(np.round(audio), -32768, 32767).astype(np.int16)
        return Speech(pcm, [(w, s, max(s, e)) for (w, _), s, e in zip(words, starts, ends)])
