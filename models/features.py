"""Input features with no learned weights: dMel audio codes and 40x40 video patches.

`DMel` turns each tick's chunk of 16 kHz audio into causal log-mel frames (80 bins, 25 ms hop:
8 frames at a 200 ms tick), streaming with an explicit state so that chunk-by-chunk equals
one-shot; `quantize` maps them to 16 levels per bin. `patchify` turns RGB frames (already resized
by the ingress) into the (B, N, 3, 40, 40) patches the hMLP stem consumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FeatureConfig:
    """Audio feature settings shared by DMel and the Vocoder.

    Log-mel is ln(max(mel_magnitude, log_floor)) with audio scaled to [-1, 1] and HTK triangles
    of peak 1. The quantisation range [lo, hi] was calibrated with synthetic signals: digital
    silence sits at ln(1e-5) = -11.5 and 1-LSB int16 dither at -6.3 on average (-4.6 at most, in
    the widest bands), both level 0; full-scale sines peak at 5.6 (1 kHz) to 6.2 (7.5 kHz) and
    full-scale white noise at 5.4, so hi = 6.5 leaves headroom and nothing real clips. One level
    is (hi - lo) / levels = 0.72 nats (about 6 dB).
    """

    sample_rate: int = 16_000
    n_mels: int = 80
    hop: int = 400  # 25 ms
    win: int = 800  # 50 ms Hann window
    n_fft: int = 1024
    levels: int = 16
    tick_ms: int = 200  # one chunk: the model's micro-turn
    log_floor: float = 1e-5
    lo: float = -5.0
    hi: float = 6.5

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def samples_per_chunk(self) -> int:
        return self.sample_rate * self.tick_ms // 1000

    @property
    def frames_per_chunk(self) -> int:
        return self.samples_per_chunk // self.hop


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(cfg: FeatureConfig) -> torch.Tensor:
    """HTK-formula triangular filters from 0 Hz to Nyquist, peak 1: (n_mels, n_fft//2 + 1)."""
    nyquist = cfg.sample_rate / 2
    freqs = torch.linspace(0.0, nyquist, cfg.n_bins, dtype=torch.float64)  # (K,)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(nyquist))), cfg.n_mels + 2, dtype=torch.float64))  # (M+2,)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    rising = (freqs - left) / (centre - left)  # (M, K)
    falling = (right - freqs) / (right - centre)  # (M, K)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class DMel(torch.nn.Module):
    """Causal streaming log-mel: frame j of a chunk is the Hann window ending at sample (j+1)*hop.

    The state holds the last win - hop samples, the left context of the next chunk's first frame.
    """

    window: torch.Tensor  # (win,) buffer
    fb: torch.Tensor  # (M, K) buffer

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.win, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(cfg), persistent=False)  # (M, K)

    def init_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.cfg.win - self.cfg.hop, dtype=torch.float32, device=device)

    def forward(self, audio: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, S) int16 or float in [-1, 1], S a multiple of hop -> logmel (B, S//hop, M), new state."""
        if audio.dtype == torch.int16:
            audio = audio.float() / 32768.0
        audio = audio.float()
        if audio.shape[-1] % self.cfg.hop:
            raise ValueError(f"audio length {audio.shape[-1]} is not a multiple of hop={self.cfg.hop}")
        x = torch.cat([state, audio], dim=-1)  # (B, win - hop + S)
        frames = x.unfold(-1, self.cfg.win, self.cfg.hop)  # (B, T, win)
        mag = torch.fft.rfft(frames * self.window, n=self.cfg.n_fft).abs()  # (B, T, K)
        mel = mag @ self.fb.T  # (B, T, M)
        logmel = torch.log(torch.clamp(mel, min=self.cfg.log_floor))
        return logmel, x[:, x.shape[-1] - state.shape[-1]:]

    def logmel_full(self, audio: torch.Tensor) -> torch.Tensor:
        """Whole signal at once, (T,) or (B, T) -> (B, T//hop, M): what streaming must reproduce."""
        audio = audio.reshape(-1, audio.shape[-1]) if audio.dim() > 1 else audio[None]
        audio = audio[:, : audio.shape[-1] // self.cfg.hop * self.cfg.hop]
        return self(audio, self.init_state(audio.shape[0], audio.device))[0]

    def quantize(self, logmel: torch.Tensor) -> torch.Tensor:
        """Float log-mel -> level codes in [0, levels), LongTensor of the same shape."""
        cfg = self.cfg
        scaled = (logmel - cfg.lo) / (cfg.hi - cfg.lo) * cfg.levels
        return torch.clamp(torch.floor(scaled), 0, cfg.levels - 1).long()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Level codes -> the log-mel at each level's centre."""
        cfg = self.cfg
        return cfg.lo + (codes.float() + 0.5) * (cfg.hi - cfg.lo) / cfg.levels


def patchify(frames: torch.Tensor, patch: int = 40) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, N, 3, patch, patch) in [-1, 1], patches in row-major order."""
    b, h, w, _ = frames.shape
    if h % patch or w % patch:
        raise ValueError(f"frame edges {h}x{w} must be multiples of patch={patch}")
    x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
    x = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, 3, H/p, W/p, p, p)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch) * (w // patch), 3, patch, patch)
