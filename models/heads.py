"""Output heads read the hidden state at a micro-turn's OUT query token.

- `TextControlHead`: one control token (categorical over CONTROLS) and `text_out` text tokens in
  parallel (slot embeddings + one shared vocabulary head; a non-byte token ends the text).
- `FlowHead`: all of a micro-turn's mel frames at once by flow matching (rectified flow, a few
  Euler steps from Gaussian noise), an MLP over frames that also mixes across them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import InteractionConfig
from models.transformer import RMSNorm


class TextControlHead(nn.Module):
    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        d = cfg.d_model
        self.ctrl = nn.Linear(d, cfg.n_controls)
        self.slot = nn.Parameter(torch.empty(cfg.text_out, d))
        self.slot_mlp = nn.Linear(d, d)
        self.slot_norm = RMSNorm(d, cfg.norm_eps)
        self.text = nn.Linear(d, cfg.vocab_size)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, d) -> control logits (B, C), text logits (B, text_out, V)."""
        hs = F.gelu(self.slot_mlp(h[:, None] + self.slot))  # (B, N, d)
        return self.ctrl(h), self.text(self.slot_norm(hs))


class FlowBlock(nn.Module):
    def __init__(self, dim: int, frames: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mix = nn.Linear(frames, frames)  # across the micro-turn's frames
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.mix(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        return h + self.mlp(self.norm2(h))


class FlowHead(nn.Module):
    """Velocity field v(x_t, t | h) over a micro-turn's (frames, n_mels) normalised log-mel."""

    t_freqs: torch.Tensor  # (16,) buffer

    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        dim = cfg.flow_dim
        self.steps = cfg.flow_steps
        self.cond = nn.Linear(cfg.d_model, dim)
        self.inp = nn.Linear(cfg.n_mels, dim)
        self.frame_pos = nn.Parameter(torch.empty(cfg.frames_per_tick, dim))
        self.register_buffer("t_freqs", torch.exp(torch.linspace(0, math.log(1000.0), 16)), persistent=False)
        self.t_proj = nn.Linear(32, dim)
        self.blocks = nn.ModuleList(FlowBlock(dim, cfg.frames_per_tick) for _ in range(cfg.flow_layers))
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, cfg.n_mels)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        ang = t[..., None] * self.t_freqs.to(t.dtype)  # (..., 16)
        return self.t_proj(torch.cat([ang.sin(), ang.cos()], dim=-1))  # (..., dim)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, F, M), t (B,) in [0, 1], c (B, dim) -> (B, F, M)."""
        temb = self.time_embedding(t.to(x.dtype)) if temb is None else temb
        h = self.inp(x) + (c + temb)[:, None] + self.frame_pos  # (B, F, dim)
        for blk in self.blocks:
            h = blk(h)
        return self.out(self.out_norm(h))

    def sample(self, hidden: torch.Tensor, noise: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Euler integration from noise (t=0) to data (t=1). hidden (B, d), noise (B, F, M)."""
        steps = steps or self.steps
        c = self.cond(hidden)
        ts = torch.arange(steps, dtype=noise.dtype, device=noise.device) / steps
        temb = self.time_embedding(ts)  # (steps, dim): the same for every row
        x = noise
        for i in range(steps):
            x = x + self.velocity(x, ts[i].expand(x.shape[0]), c, temb[i]) / steps
        return x

    def loss(self, hidden: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Conditional flow matching: regress the straight-path velocity target - noise."""
        tt = t.to(target.dtype)[:, None, None]
        xt = (1 - tt) * noise + tt * target
        return F.mse_loss(self.velocity(xt, t, self.cond(hidden)), target - noise)
