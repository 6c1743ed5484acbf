"""Early fusion with no pretrained encoders: every input becomes d_model-wide tokens here.

dMel codes go through per-bin code tables summed over bins (the input stream and the model's own
previous output are summed into the same token, so it hears itself at no extra positions); 40x40
video patches through a hierarchical MLP stem; the tick's clock through fixed sinusoids.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import InteractionConfig


class DMelEmbedding(nn.Module):
    """dMel codes of `n_streams` aligned streams -> one token per frame.

    Each (stream, bin) has its own `levels`-entry table; entries are summed over bins and streams
    (one embedding_bag), then projected to d_model. codes: n_streams x (N, n_mels) -> (N, d).
    """

    offsets: torch.Tensor  # (S*M,) buffer: each (stream, bin)'s first row in `table`

    def __init__(self, n_mels: int, levels: int, dim: int, d_model: int, n_streams: int = 2):
        super().__init__()
        self.n_mels, self.levels, self.n_streams = n_mels, levels, n_streams
        self.table = nn.Parameter(torch.empty(n_streams * n_mels * levels, dim))
        self.proj = nn.Linear(dim, d_model, bias=False)
        self.register_buffer("offsets", torch.arange(n_streams * n_mels) * levels, persistent=False)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.table, std=1.0 / math.sqrt(self.n_streams * self.n_mels))
        nn.init.normal_(self.proj.weight, std=std)

    def forward(self, *codes: torch.Tensor) -> torch.Tensor:
        idx = torch.cat(codes, dim=-1) + self.offsets  # (N, S*M)
        return self.proj(F.embedding_bag(idx, self.table, mode="sum"))  # (N, d)


class HMLPStem(nn.Module):
    """Hierarchical MLP patch stem (Touvron et al. 2022): 4x4 pixel blocks, then 2x2 merges,
    then the whole patch, each stage linear + LayerNorm + GELU. (N, 3, P, P) -> (N, d)."""

    def __init__(self, patch: int, dims: tuple[int, int], d_model: int):
        super().__init__()
        self.g = patch // 8  # 2x2-merged blocks per side
        c1, c2 = dims
        self.stage1 = nn.Sequential(nn.Linear(3 * 16, c1), nn.LayerNorm(c1), nn.GELU())
        self.stage2 = nn.Sequential(nn.Linear(4 * c1, c2), nn.LayerNorm(c2), nn.GELU())
        self.stage3 = nn.Linear(self.g * self.g * c2, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, g = x.shape[0], x.shape[1], self.g
        x = x.view(n, c, g, 2, 4, g, 2, 4)  # pixel y = (a*2 + b)*4 + r, same for x
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(n, g, g, 4, c * 16)  # (N, g, g, 2x2, 4x4 block)
        x = self.stage1(x)  # (N, g, g, 4, c1)
        x = self.stage2(x.reshape(n, g, g, -1))  # (N, g, g, c2)
        return self.stage3(x.reshape(n, -1))  # (N, d)


class ClockEmbedding(nn.Module):
    """The session's time in seconds as sinusoids with periods 0.4 s .. ~3.6 h, projected to d.

    Angles are computed in float64 so clocks hours in stay exact before the cast."""

    def __init__(self, d_model: int, n_freqs: int = 16):
        super().__init__()
        self.n_freqs = n_freqs
        self.proj = nn.Linear(2 * n_freqs, d_model, bias=False)

    def forward(self, seconds: torch.Tensor) -> torch.Tensor:
        periods = 0.4 * 2.0 ** torch.arange(self.n_freqs, dtype=torch.float64, device=seconds.device)
        ang = seconds.to(torch.float64)[:, None] * (2 * math.pi / periods)  # (B, n_freqs)
        feats = torch.cat([ang.sin(), ang.cos()], dim=-1).to(self.proj.weight.dtype)
        return self.proj(feats)  # (B, d)


class InputEmbedding(nn.Module):
    """Every input stream's embedding tables; the per-tick layout lives in InteractionModel.embed."""

    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, d)  # bytes, specials (time, OUT, markers, pad)
        self.ctrl = nn.Embedding(cfg.n_controls, d)  # control emitted last tick, fed back
        self.fb_slot = nn.Parameter(torch.empty(cfg.text_out, d))  # slot of a fed-back text token
        self.stream = nn.Parameter(torch.empty(2, d))  # 0: typed text, 1: background update
        self.mel = DMelEmbedding(cfg.n_mels, cfg.mel_levels, cfg.dmel_dim, d, n_streams=2)
        self.frame_pos = nn.Parameter(torch.empty(cfg.frames_per_tick, d))
        self.stem = HMLPStem(cfg.patch, cfg.stem_dims, d)
        self.patch_pos = nn.Parameter(torch.empty(cfg.n_patches, d))
        self.clock = ClockEmbedding(d)

    def reset_parameters(self, std: float) -> None:
        for p in (self.tok.weight, self.ctrl.weight, self.fb_slot, self.stream, self.frame_pos, self.patch_pos):
            nn.init.normal_(p, std=std)
        self.mel.reset_parameters(std)
        nn.init.normal_(self.clock.proj.weight, std=std)
