"""`Resampler`: streaming rational resampling (16 kHz <-> 24 kHz) for many rows at once.

The system's audio is 16 kHz; Mimi's is 24 kHz. A `Resampler(up, down)` zero-stuffs by `up`,
low-passes with a Kaiser-windowed sinc (causal FIR, `taps` long at the upsampled rate) and keeps
every `down`-th sample. Each row carries its own state, the last `taps - 1` upsampled samples,
so feeding a signal in blocks gives what one pass over the whole signal gives (to float rounding),
as long as every block is a whole number of `down` input samples (`block` checks it). The delay
is (taps - 1) / 2 upsampled samples (1 ms at the default for 16 <-> 24 kHz).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Resampler:
    def __init__(self, up: int, down: int, taps_per_phase: int = 32, beta: float = 8.0, rolloff: float = 0.92,
                 device: str | torch.device = "cpu"):
        g = math.gcd(up, down)
        self.up, self.down = up // g, down // g
        self.taps = taps_per_phase * max(self.up, self.down) + 1
        cutoff = rolloff * 0.5 / max(self.up, self.down)  # cycles per upsampled sample
        n = torch.arange(self.taps, dtype=torch.float64) - (self.taps - 1) / 2
        h = 2 * cutoff * torch.sinc(2 * cutoff * n) * torch.kaiser_window(self.taps, periodic=False, beta=beta, dtype=torch.float64)
        h = h / h.sum() * self.up  # unit gain at DC after zero-stuffing
        self.kernel = h.flip(0).to(torch.float32).to(device)[None, None]  # (1, 1, taps): conv1d correlates

    def init_state(self, rows: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(rows, self.taps - 1, device=device)  # (rows, taps - 1)

    def out_len(self, n: int) -> int:
        self.block(n)
        return n * self.up // self.down

    def block(self, n: int) -> None:
        if n % self.down:
            raise ValueError(f"a block must be a whole number of {self.down} samples, got {n}")

    def __call__(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (rows, n) float, state (rows, taps - 1) -> (rows, n * up / down), the next state."""
        rows, n = x.shape
        self.block(n)
        stuffed = x.new_zeros(rows, n * self.up)  # (rows, n * up)
        stuffed[:, :: self.up] = x
        full = torch.cat([state, stuffed], dim=1)  # (rows, taps - 1 + n * up)
        y = F.conv1d(full[:, None], self.kernel, stride=self.down)[:, 0]  # (rows, n * up / down)
        return y, full[:, -(self.taps - 1):].clone()
