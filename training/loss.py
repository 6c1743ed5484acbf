"""The training loss: `InteractionModel.loss` with a class-weighted control loss.

The control loss is weighted by inverse square-root class frequency, capped at 3x (silence
dominates; "yield" and "delegate" are rare); the text loss ignores the padding after a tick's
end-of-text. `PARTS` are the loss terms logged apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.model import InteractionModel, TickInputs

PARTS = ("ctrl", "text", "flow", "balance")


def control_weights(counts: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """Inverse square-root frequency relative to the commonest control, at most `cap` (1 for
    controls never seen), scaled so the mean over the targets is 1. The cap keeps a greedy choice
    honest: weighting a control by w moves its decision threshold by w, and an uncapped rare
    "delegate" would win every ambiguous reply onset."""
    f = counts.double() / counts.sum().clamp_min(1)
    w = torch.where(counts > 0, (f.max() / f.clamp_min(1e-12)).sqrt().clamp(max=cap), torch.ones_like(f))
    return (w / (f * w).sum().clamp_min(1e-12)).float()


def loss_parts(model: InteractionModel, inp: TickInputs, tgt: dict[str, torch.Tensor], ctrl_weight: torch.Tensor,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`InteractionModel.loss` with a class-weighted control loss and the text loss over a
    tick's bytes and its end-of-text only (what follows it is never fed back or said)."""
    cfg = model.cfg
    x, out_pos = model.sequence(inp)
    h, aux = model.transformer.forward_full(x, torch.arange(x.shape[1], device=x.device))
    h_out = h[0, out_pos]
    ctrl, text = model.predict(h_out)
    noise = torch.randn(tgt["mel"].shape, generator=generator).to(h_out)
    t = torch.rand(h_out.shape[0], generator=generator).to(h_out)
    parts = {
        "ctrl": F.cross_entropy(ctrl.float(), tgt["ctrl"], weight=ctrl_weight.to(h_out.device)),
        "text": F.cross_entropy(text.float().reshape(-1, text.shape[-1]), tgt["text"].reshape(-1), ignore_index=model.tokenizer.pad_id),
        "flow": model.flow.loss(h_out, model.normalize_mel(tgt["mel"].to(h_out)), noise, t),
        "balance": aux if aux is not None else h_out.new_zeros(()),
    }
    parts["loss"] = parts["ctrl"] + parts["text"] + parts["flow"] + cfg.aux_loss_coef * parts["balance"]
    return parts
