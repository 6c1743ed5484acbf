"""Decoder-only MoE transformer: RMSNorm pre-norm, RoPE, grouped-query attention, top-k experts.

Two entry points share every weight and every attention rule:
- `forward_step`: one micro-turn's new tokens for a batch of sessions against a static KV cache
  (sinks + ring window); cost is bounded by the window, not by the session's length.
- `forward_full`: a whole sequence at once with the equivalent mask; the reference the streaming
  path must reproduce, and the training path.

Visibility (both paths): a token at position q sees position p iff p <= q and (p < n_sink or
q - p < window).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.config import InteractionConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Rope(nn.Module):
    """Rotary embedding with angles computed in float64, so positions in the millions stay exact."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) long -> cos, sin (B, 1, T, hd/2) in dtype."""
        # Not a buffer: module.to(dtype) would cast it down.
        inv = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device) / self.head_dim)
        ang = positions.to(torch.float64)[..., None] * inv  # (B, T, hd/2)
        return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """The attention rule; k_pos < 0 marks an empty cache slot. Broadcasts q_pos against k_pos."""
    return (k_pos >= 0) & (k_pos <= q_pos) & ((k_pos < n_sink) | (q_pos - k_pos < window))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool visibility -> 0 / -inf in dtype; built once per tick and shared by every layer
    (SDPA would otherwise convert a bool mask in each layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Attention(nn.Module):
    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.group = cfg.n_heads // cfg.n_kv_heads
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.n_heads + 2 * self.n_kv, self.hd).transpose(1, 2)  # (B, H+2KV, T, hd)
        qk, v = qkv.split([self.n_heads + self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(qk, cos, sin).split([self.n_heads, self.n_kv], dim=1)
        return q, k, v  # q (B,H,T,hd), k/v (B,KV,T,hd)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B,H,T,hd), k/v (B,KV,S,hd), mask (B,1,G*T,S) additive (already folded) -> (B,T,d).

        GQA without copying K/V: the G query heads sharing a KV head are folded into its query axis.
        """
        b, _, t, hd = q.shape
        qf = q.reshape(b, self.n_kv, self.group * t, hd)  # head h = kv * G + g
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask)  # (B, KV, G*T, hd)
        return self.wo(o.view(b, self.n_heads, t, hd).transpose(1, 2).reshape(b, t, -1))

    def forward_step(self, x, cos, sin, cache_k, cache_v, write_idx, valid, mask):
        """Write this tick's keys/values into the cache rows [0, B), then attend over those rows.

        cache_k/v (MS, KV, S, hd); write_idx (N*KV,) flat row-major indices into cache.view(-1, hd)
        for the N valid tokens; valid (B, T) bool. The ring holds a tick more than the window, so
        writing first never evicts a key some query of this tick still sees.
        """
        q, k, v = self.project(x, cos, sin)
        b = x.shape[0]
        hd = self.hd
        cache_k.view(-1, hd).index_copy_(0, write_idx, k.transpose(1, 2)[valid].reshape(-1, hd))
        cache_v.view(-1, hd).index_copy_(0, write_idx, v.transpose(1, 2)[valid].reshape(-1, hd))
        return self.attend(q, cache_k[:b], cache_v[:b], mask)

    def forward_full(self, x, cos, sin, positions, n_sink: int, window: int, block: int = 256):
        """x (B, N, d) whole sequences (positions (N,) shared); query blocks see only their keys."""
        q, k, v = self.project(x, cos, sin)
        n = x.shape[1]
        outs = []
        for a in range(0, n, block):
            e = min(a + block, n)
            s = min(n_sink, e)
            keys = torch.cat([torch.arange(0, s), torch.arange(max(a - window + 1, s), e)]).to(x.device)
            m = visible(positions[a:e, None], positions[keys][None], n_sink, window)  # (T, K)
            m = additive_mask(m.repeat(self.group, 1)[None, None], q.dtype)  # (1, 1, G*T, K)
            outs.append(self.attend(q[:, :, a:e], k[:, :, keys], v[:, :, keys], m))
        return torch.cat(outs, dim=1)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with stacked weights and grouped dispatch, plus an optional
    always-on shared expert.

    Dispatch sorts (token, expert) pairs by expert; then either one bmm over all groups padded to
    the largest (when that wastes at most half the rows) or one matmul per expert on its exact
    group (an untrained router is often far from balanced: padding cost ~3x there). Never a
    per-token weight gather, no capacity limit: a token's output does not depend on which other
    tokens share the batch (up to float rounding between the two kernels).
    """

    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        d, ff, e = cfg.d_model, cfg.d_ff, cfg.n_experts
        self.n_experts, self.top_k = e, cfg.top_k
        self.router = nn.Linear(d, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, d, 2 * ff))  # gate | up, one matmul
        self.w2 = nn.Parameter(torch.empty(e, ff, d))  # down
        self.shared = SwiGLU(d, cfg.d_ff_shared) if cfg.d_ff_shared else None

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)

    chunk_tokens = 8192  # long full-sequence passes go through in pieces: bounded activations

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, d) -> y (N, d), load-balancing loss (training only, else None)."""
        if not self.training and x.shape[0] > self.chunk_tokens:
            return torch.cat([self._forward(c)[0] for c in x.split(self.chunk_tokens)]), None
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, d = x.shape
        k, e = self.top_k, self.n_experts
        logits = self.router(x)
        probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)  # (N, E)
        weight, expert = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:
            weight = weight / weight.sum(-1, keepdim=True)

        flat = expert.reshape(-1)  # (N*k,)
        order = torch.argsort(flat, stable=True)
        tok = order // k  # token of each (token, expert) pair, grouped by expert
        counts = torch.bincount(flat, minlength=e)  # (E,)
        w = weight.reshape(-1)[order, None].to(x.dtype)  # (N*k, 1)
        cap = int(counts.max())
        if e * cap <= 2 * n * k:
            # Balanced enough: one bmm over groups padded to the largest (fewest ops).
            start = torch.cumsum(counts, 0) - counts
            e_sorted = flat[order]
            rank = torch.arange(n * k, device=x.device) - start[e_sorted]  # place within its group
            buf = x.new_zeros(e, cap, d)
            buf[e_sorted, rank] = x[tok]
            out = torch.bmm(self._swiglu(torch.bmm(buf, self.w13)), self.w2)  # (E, cap, d)
            contrib = out[e_sorted, rank] * w
        else:
            # Skewed (an untrained router often is): each expert's exact group, one matmul each.
            outs = []
            for i, xe in enumerate(torch.split(x[tok], counts.tolist())):
                if xe.shape[0]:
                    outs.append(torch.mm(self._swiglu(torch.mm(xe, self.w13[i])), self.w2[i]))
            contrib = torch.cat(outs) * w  # (N*k, d)
        y = x.new_zeros(n, d).index_add_(0, tok, contrib)
        if self.shared is not None:
            y = y + self.shared(x)

        aux = None
        if self.training:
            # Switch-style: E * sum_e (fraction of routed pairs to e) * (mean router prob of e).
            frac = counts.float() / (n * k)
            aux = e * torch.sum(frac * probs.mean(0))
        return y, aux

    @staticmethod
    def _swiglu(gu: torch.Tensor) -> torch.Tensor:
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u


class SwiGLU(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)
        self.w3 = nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.moe = MoE(cfg)

    def ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, aux = self.moe(self.ffn_norm(x).reshape(-1, x.shape[-1]))
        return x + y.view_as(x), aux


class Transformer(nn.Module):
    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = Rope(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    @property
    def blocks(self) -> Sequence[Block]:
        """`layers` as the Blocks they are (ModuleList iterates as plain Modules to a type checker)."""
        return cast(Sequence[Block], self.layers)

    def forward_step(self, x, positions, valid, caches, write_idx, mask):
        """x (B, T, d) this tick's tokens (padded), positions (B, T), valid (B, T) bool,
        caches [(k, v)] per layer, mask (B, 1, G*T, S) -> hidden (B, T, d)."""
        cos, sin = self.rope(positions, x.dtype)
        for layer, (ck, cv) in zip(self.blocks, caches):
            x = x + layer.attn.forward_step(layer.attn_norm(x), cos, sin, ck, cv, write_idx, valid, mask)
            x, _ = layer.ffn(x)
        return self.norm(x)

    def forward_full(self, x, positions, block: int = 256):
        """x (B, N, d), positions (N,) -> hidden (B, N, d), summed load-balancing loss (training)."""
        cos, sin = self.rope(positions[None], x.dtype)
        aux_total = None
        for layer in self.blocks:
            x = x + layer.attn.forward_full(layer.attn_norm(x), cos, sin, positions, self.cfg.n_sink, self.cfg.window, block)
            x, aux = layer.ffn(x)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), aux_total
