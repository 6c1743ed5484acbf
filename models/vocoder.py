"""A weight-free, deterministic vocoder: log-mel frames (DMel's scale) -> 16 kHz int16 audio.

Mel bands go back to linear-frequency magnitudes by spreading each band's mean magnitude over
its triangle (a non-negative inverse that keeps the summed magnitude, so partials keep their
amplitude). Phase comes from a phase vocoder with peak locking: every local maximum of the
magnitudes is a partial at its parabolically interpolated frequency p, whose phase advances by
2*pi*p*hop/n_fft per frame; the bins around it share that phase, laid out as a Hann-windowed
sinusoid centred in the frame. Frames are inverse-FFT'd and overlap-added (hop 400) with the
least-squares ISTFT normalisation, so a steady partial comes back at its own amplitude. A partial
spread over the wide high bands comes back as short grains, one per hop (a 40 Hz roughness):
fine for tests and demos, no match for a trained vocoder.

Latency: frame t is laid over samples [t*hop, t*hop + win), so the second half of a chunk's last
frame (win - hop = 400 samples, 25 ms) is carried in the state and emitted with the next chunk.
Audio from frame t comes out centred one hop (25 ms) after the analysis window DMel centres at
t*hop, and a stream's first 25 ms fade in.
"""

from __future__ import annotations

import math

import torch

from models.features import FeatureConfig, mel_filterbank


class Vocoder(torch.nn.Module):
    """Streaming mel-to-audio; state is {"theta": (B, n_fft//2+1), "tail": (B, win - hop)}, float32.

    `theta` is each bin's partial phase at the start of the last frame; `tail` is the overlap-add
    remainder. Both have batch as dim 0 so sessions can be gathered and scattered.
    """

    inv_fb: torch.Tensor  # (K, M) buffer
    bins: torch.Tensor  # (K,) buffer
    synth_window: torch.Tensor  # (win,) buffer

    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        super().__init__()
        if cfg.win % cfg.hop:
            raise ValueError(f"win={cfg.win} must be a multiple of hop={cfg.hop} for overlap-add")
        self.cfg = cfg
        fb = mel_filterbank(cfg)  # (M, K)
        self.register_buffer("inv_fb", (fb / fb.sum(1, keepdim=True)).T.contiguous(), persistent=False)  # (K, M)
        self.register_buffer("bins", torch.arange(cfg.n_bins), persistent=False)  # (K,)
        window = torch.hann_window(cfg.win, periodic=True)
        norm = (window**2).view(-1, cfg.hop).sum(0).repeat(cfg.win // cfg.hop)  # overlapped sum of window^2
        self.register_buffer("synth_window", window / norm, persistent=False)  # (win,)

    def init_state(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        k = torch.arange(self.cfg.n_bins, device=device, dtype=torch.float64)
        # Schroeder phases: partials that start together do not add up to one loud click.
        theta = (math.pi * k**2 / self.cfg.n_bins).remainder(2 * math.pi).float()
        return {
            "theta": theta.expand(batch, -1).clone(),
            "tail": torch.zeros(batch, self.cfg.win - self.cfg.hop, dtype=torch.float32, device=device),
        }

    def _locked_phase(self, mag: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: mag (B, K), previous theta (B, K) -> bin phases (B, K), new theta (B, K)."""
        cfg, k = self.cfg, self.bins
        left = torch.cat([mag[:, :1], mag[:, :-1]], 1)  # (B, K)
        right = torch.cat([mag[:, 1:], mag[:, -1:]], 1)  # (B, K)
        peak = (mag > left) & (mag >= right) & (mag > 0)  # (B, K)
        la, lb, lc = (torch.log(torch.clamp(x, min=1e-10)) for x in (left, mag, right))
        curvature = la - 2 * lb + lc
        offset = torch.where(peak & (curvature < 0), 0.5 * (la - lc) / torch.clamp(curvature, max=-1e-9), 0.0)
        freq = k + torch.clamp(offset, -0.5, 0.5)  # (B, K) fractional bin of the partial at each peak

        # Each bin follows its nearest peak; bins with no peak anywhere follow themselves.
        n = cfg.n_bins
        before = torch.cummax(torch.where(peak, k, -2 * n), 1).values  # (B, K)
        after = torch.cummin(torch.where(peak, k, 3 * n).flip(1), 1).values.flip(1)  # (B, K)
        owner = torch.where(k - before <= after - k, before, after)
        owner = torch.where((owner < 0) | (owner >= n), k, owner)  # (B, K)

        f = torch.gather(freq, 1, owner)  # (B, K)
        theta = torch.remainder(torch.gather(theta, 1, owner) + 2 * math.pi * f * cfg.hop / cfg.n_fft, 2 * math.pi)
        phase = theta - 2 * math.pi * (k - f) * (cfg.win / 2) / cfg.n_fft  # sinusoid centred in the window
        return phase, theta

    def forward(self, logmel: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """logmel (B, T, M) -> audio int16 (B, T*hop), new state. T is one tick's frames (8 at 200 ms)."""
        cfg = self.cfg
        b, t, _ = logmel.shape
        # Anything far above `hi` clips at full scale anyway; the clamp keeps exp() finite.
        mag = torch.exp(torch.clamp(logmel.float(), max=cfg.hi + 5.0)) @ self.inv_fb.T  # (B, T, K)
        theta, phases = state["theta"], []
        for i in range(t):  # phases depend on the previous frame's; the rest is batched
            phase, theta = self._locked_phase(mag[:, i], theta)
            phases.append(phase)
        spec = torch.polar(mag, torch.stack(phases, 1))  # (B, T, K)
        frames = torch.fft.irfft(spec, n=cfg.n_fft)[..., : cfg.win] * self.synth_window  # (B, T, win)

        r = cfg.win // cfg.hop
        out = torch.zeros(b, t + r - 1, cfg.hop, dtype=frames.dtype, device=frames.device)
        out[:, : r - 1] += state["tail"].view(b, r - 1, cfg.hop)
        segments = frames.reshape(b, t, r, cfg.hop)  # (B, T, r, hop)
        for i in range(r):
            out[:, i : i + t] += segments[:, :, i]
        audio = out[:, :t].reshape(b, t * cfg.hop)  # (B, T*hop)
        pcm = torch.clamp(torch.round(audio * 32768.0), -32768, 32767).to(torch.int16)
        return pcm, {"theta": theta, "tail": out[:, t:].reshape(b, (r - 1) * cfg.hop)}

    def synthesize_full(self, logmel: torch.Tensor) -> torch.Tensor:
        """All frames at once, (B, T, M) -> int16 (B, T*hop): what streaming must reproduce."""
        return self(logmel, self.init_state(logmel.shape[0], logmel.device))[0]
