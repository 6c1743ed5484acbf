"""`InteractionModel`: early-fusion embeddings, MoE transformer, text/control and flow heads.

One micro-turn of one session is laid out as

    [time marker + last tick's control/text] [F audio tokens: input dMel + own last output dMel]
    [video patches, if a frame came] [typed text] [background update] [OUT query]

and the hidden state at OUT predicts the micro-turn's control, text tokens and F mel frames (F =
tick_ms / 25 ms: 8 at 200 ms). `TickInputs` carries a batch of such micro-turns, built from chunks
by `models.inputs.InputBuilder` only; the streaming engine embeds one per session per tick,
`reference_forward` embeds a whole session at once and runs the full-sequence pass that the
streaming path must reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.config import CONTROLS, InteractionConfig
from models.embeddings import InputEmbedding
from models.heads import FlowHead, TextControlHead
from models.tokenizer import ByteTokenizer
from models.transformer import MoE, RMSNorm, Transformer


@dataclass
class TickInputs:
    """A batch of B micro-turns (one per session), everything the model sees for them."""

    mel_codes: torch.Tensor  # (B, F, M) long: dMel codes of the input audio
    self_codes: torch.Tensor  # (B, F, M) long: dMel codes of what the model said last tick
    prev_ctrl: torch.Tensor  # (B,) long: index in CONTROLS of last tick's control
    prev_text: torch.Tensor  # (B, N) long: last tick's text tokens, pad after the end
    tick: torch.Tensor  # (B,) long: the session's clock, in ticks since it started
    patches: torch.Tensor | None = None  # (Bv, P, 3, p, p) float for the rows in video_rows
    video_rows: list[int] = field(default_factory=list)
    text_ids: list[list[int]] = field(default_factory=list)  # per row, typed text this tick
    bg_ids: list[list[int]] = field(default_factory=list)  # per row, background update this tick

    def __post_init__(self) -> None:
        if self.video_rows and (self.patches is None or len(self.patches) != len(self.video_rows)):
            raise ValueError(f"{len(self.video_rows)} video rows need as many patch sets, not {None if self.patches is None else len(self.patches)}")
        b = self.mel_codes.shape[0]
        self.text_ids = self.text_ids or [[] for _ in range(b)]
        self.bg_ids = self.bg_ids or [[] for _ in range(b)]

    @property
    def batch(self) -> int:
        return self.mel_codes.shape[0]

    def lengths(self, cfg: InteractionConfig) -> list[int]:
        vid = set(self.video_rows)
        f = cfg.frames_per_tick
        return [1 + f + (cfg.n_patches if i in vid else 0) + len(self.text_ids[i]) + len(self.bg_ids[i]) + 1 for i in range(self.batch)]

    def row(self, i: int) -> "TickInputs":
        """Row i alone (B = 1), copied to the CPU (the engine's state tensors change next tick)."""
        vi = self.video_rows.index(i) if i in self.video_rows else None
        patches = None if vi is None or self.patches is None else self.patches[vi : vi + 1].cpu().clone()
        cp = lambda t: t[i : i + 1].cpu().clone()  # noqa: E731
        return TickInputs(
            cp(self.mel_codes), cp(self.self_codes), cp(self.prev_ctrl), cp(self.prev_text), cp(self.tick),
            patches, [] if patches is None else [0],
            [list(self.text_ids[i])], [list(self.bg_ids[i])],
        )

    @staticmethod
    def cat(items: list["TickInputs"]) -> "TickInputs":
        rows, patches, off = [], [], 0
        for it in items:
            rows += [off + r for r in it.video_rows]
            if it.patches is not None:
                patches.append(it.patches)
            off += it.batch
        return TickInputs(
            torch.cat([it.mel_codes for it in items]), torch.cat([it.self_codes for it in items]),
            torch.cat([it.prev_ctrl for it in items]), torch.cat([it.prev_text for it in items]),
            torch.cat([it.tick for it in items]), torch.cat(patches) if patches else None, rows,
            [t for it in items for t in it.text_ids], [t for it in items for t in it.bg_ids],
        )

    def to(self, device) -> "TickInputs":
        mv = lambda t: t.to(device)  # noqa: E731
        return TickInputs(mv(self.mel_codes), mv(self.self_codes), mv(self.prev_ctrl), mv(self.prev_text), mv(self.tick),
                          None if self.patches is None else mv(self.patches), list(self.video_rows), self.text_ids, self.bg_ids)


def flow_noise(seed: int, tick: int, frames: int, n_mels: int) -> torch.Tensor:
    """The flow head's starting noise for one session's tick: a function of (seed, tick) only,
    so outputs are reproducible and do not depend on the batch. float32 (F, M) on the CPU."""
    g = torch.Generator().manual_seed(_mix(seed, tick))
    return torch.randn(frames, n_mels, generator=g)


def _mix(seed: int, tick: int) -> int:
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(tick) + 1) & 0xFFFFFFFFFFFFFFFF  # splitmix64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


class InteractionModel(nn.Module):
    def __init__(self, cfg: InteractionConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = ByteTokenizer()
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"config vocab_size={cfg.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size}")
        if list(self.tokenizer.control_names) != list(CONTROLS):
            raise ValueError("tokenizer control order differs from protocols.chunks.CONTROLS")
        self.embed_in = InputEmbedding(cfg)
        self.transformer = Transformer(cfg)
        self.heads = TextControlHead(cfg)
        self.flow = FlowHead(cfg)
        self.reset_parameters()

    # ---- initialisation and sizes ----
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / (2 * self.cfg.n_layers) ** 0.5  # residual projections, GPT-2 style
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=out_std if name.endswith(("wo", "w2")) else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                bias = getattr(m, "bias", None)  # RMSNorm has none
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            elif isinstance(m, MoE):
                m.reset_parameters(std, out_std)
        self.embed_in.reset_parameters(std)
        nn.init.normal_(self.heads.slot, std=std)
        with torch.no_grad():  # a prior, not a rule: a trained model speaks when it means to
            self.heads.ctrl.bias[CONTROLS.index("silent")] = self.cfg.quiet_prior
            self.heads.text.bias[self.tokenizer.eot_id] = self.cfg.quiet_prior
        nn.init.normal_(self.flow.frame_pos, std=std)

    def num_params(self, active: bool = False) -> int:
        """All parameters, or those one token uses (top_k of n_experts routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        c = self.cfg
        idle = c.n_layers * (c.n_experts - c.top_k) * 3 * c.d_model * c.d_ff
        return total - idle

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_in.tok.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_in.tok.weight.device

    # ---- one micro-turn's tokens ----
    def embed(self, inp: TickInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> x (B, T, d) with each row's tokens left-aligned and zero padding, lengths (B,) long."""
        cfg, E, tk = self.cfg, self.embed_in, self.tokenizer
        b, f, p = inp.batch, cfg.frames_per_tick, cfg.n_patches
        lengths = inp.lengths(cfg)
        dev = self.device
        x = torch.zeros(b, max(lengths), cfg.d_model, dtype=self.dtype, device=dev)

        fed_back = (E.tok(inp.prev_text) + E.fb_slot).sum(1)  # (B, d)
        seconds = inp.tick.to(torch.float64) * cfg.tick_s
        x[:, 0] = E.tok.weight[tk.time_id] + E.clock(seconds) + E.ctrl(inp.prev_ctrl) + fed_back
        audio = E.mel(inp.mel_codes.reshape(b * f, -1), inp.self_codes.reshape(b * f, -1))  # (B*F, d)
        x[:, 1 : 1 + f] = audio.view(b, f, -1) + E.frame_pos
        if inp.video_rows and inp.patches is not None:  # TickInputs checks they come together
            pt = inp.patches.to(self.dtype)
            vid = E.stem(pt.reshape(-1, *pt.shape[2:])).view(len(inp.video_rows), p, -1) + E.patch_pos
            x[torch.tensor(inp.video_rows, device=dev), 1 + f : 1 + f + p] = vid

        rows, cols, ids, streams = [], [], [], []
        vid_set = set(inp.video_rows)
        for i in range(b):
            col = 1 + f + (p if i in vid_set else 0)
            for s, seq in ((0, inp.text_ids[i]), (1, inp.bg_ids[i])):
                n = len(seq)
                rows += [i] * n
                cols += range(col, col + n)
                ids += seq
                streams += [s] * n
                col += n
        if ids:
            t = lambda v: torch.tensor(v, device=dev)  # noqa: E731
            x[t(rows), t(cols)] = E.tok(t(ids)) + E.stream[t(streams)]
        lens = torch.tensor(lengths, device=dev)
        x[torch.arange(b, device=dev), lens - 1] = E.tok.weight[tk.out_id]
        return x, lens

    # ---- heads ----
    def predict(self, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states at OUT (B, d) -> control logits (B, C), text logits (B, N, V)."""
        return self.heads(h_out)

    def sample_mel(self, h_out: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """-> log-mel frames (B, F, M) on DMel's scale, clamped to what dMel represents
        (silence floor .. top level), so an untrained head cannot ask the vocoder for e^15."""
        mel = self.denormalize_mel(self.flow.sample(h_out, noise.to(h_out.dtype)))
        return mel.clamp(self.cfg.mel_floor, self.cfg.mel_hi)

    def normalize_mel(self, logmel: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return (logmel - (c.mel_hi + c.mel_lo) / 2) / ((c.mel_hi - c.mel_lo) / 2)

    def denormalize_mel(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return x * ((c.mel_hi - c.mel_lo) / 2) + (c.mel_hi + c.mel_lo) / 2

    # ---- whole-sequence reference and training ----
    def sequence(self, ticks: TickInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """K consecutive micro-turns of ONE session (as a batch of K rows) -> its token sequence
        (1, N, d) and the positions of the K OUT tokens."""
        x, lens = self.embed(ticks)
        valid = torch.arange(x.shape[1], device=x.device)[None] < lens[:, None]
        return x[valid][None], torch.cumsum(lens, 0) - 1

    def reference_forward(self, ticks: TickInputs, noise: torch.Tensor, block: int = 256) -> dict[str, torch.Tensor]:
        """One full forward over a session's whole sequence with the streaming attention rule
        (causal, sinks + window), teacher-forced with the fed-back outputs inside `ticks`.
        noise (K, F, M): each tick's flow noise. Returns per-tick predictions."""
        x, out_pos = self.sequence(ticks)
        pos = torch.arange(x.shape[1], device=x.device)
        h, _ = self.transformer.forward_full(x, pos, block)
        h_out = h[0, out_pos]  # (K, d)
        ctrl, text = self.predict(h_out)
        return {"hidden": h_out, "ctrl_logits": ctrl, "text_logits": text, "mel": self.sample_mel(h_out, noise)}

    def loss(self, ticks: TickInputs, targets: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Teacher-forced loss over one session's K micro-turns.

        targets: "ctrl" (K,) control indices, "text" (K, N) token ids (pad after the end),
        "mel" (K, F, M) log-mel to speak. Returns the parts and their weighted sum "loss".
        """
        x, out_pos = self.sequence(ticks)
        pos = torch.arange(x.shape[1], device=x.device)
        h, aux = self.transformer.forward_full(x, pos)
        h_out = h[0, out_pos]
        ctrl, text = self.predict(h_out)
        k = h_out.shape[0]
        noise = torch.randn(targets["mel"].shape, generator=generator).to(h_out)
        t = torch.rand(k, generator=generator).to(h_out)
        parts = {
            "ctrl": F.cross_entropy(ctrl.float(), targets["ctrl"]),
            "text": F.cross_entropy(text.float().reshape(-1, text.shape[-1]), targets["text"].reshape(-1)),
            "flow": self.flow.loss(h_out, self.normalize_mel(targets["mel"].to(h_out)), noise, t),
            "balance": aux if aux is not None else h_out.new_zeros(()),
        }
        parts["loss"] = parts["ctrl"] + parts["text"] + parts["flow"] + self.cfg.aux_loss_coef * parts["balance"]
        return parts


def build_model(cfg: InteractionConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> InteractionModel:
    """Construct directly on `device` in `dtype` (no float32 detour, so gpu12b fits in bf16;
    device="meta" allocates nothing)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = InteractionModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model
