"""`train_loop`: Ray Train's per-worker function (it also runs without Ray, as one worker).

Workers split the training dialogues, each takes `batch / workers` windows a step and gradients
are averaged across them. Everything random is a function of (seed, worker rank, step): the
windows, the flow-matching noise, so a resumed run draws the very same windows as an
uninterrupted one. Every `save_every_s` seconds (and at the end) rank 0 saves the weights and
the training state (`train_state.save_state`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import build_model
from training.loss import PARTS, control_weights, loss_parts
from training.recipe import Recipe
from training.train_state import STATE_FILE, find_state, save_state
from training.windows import feed_back_own_speech, load_dialogues, window


def train_loop(config: dict) -> None:
    """Ray Train's per-worker function (also runs without Ray, as one worker)."""
    import torch.distributed as dist

    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config["recipe"].items()}
    recipe = Recipe(**fields)
    threads = config.get("threads") or 0
    if threads:
        torch.set_num_threads(threads)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        from ray import train as ray_train

        ctx = ray_train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    except Exception:
        ray_train = None
    device = torch.device("cuda" if torch.cuda.is_available() and config.get("use_gpu") else "cpu")
    log_file = Path(config["state"]).with_name(Path(config["state"]).name + ".log")

    def say(line: str) -> None:
        if rank == 0:  # not print(): Ray Train patches it to log each line a second time
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                f.write(time.strftime("%H:%M:%S ") + line + "\n")
    if recipe.batch % world:
        raise ValueError(f"batch={recipe.batch} must be a multiple of the {world} workers")

    cfg = InteractionConfig.preset(recipe.preset)
    state_dir, out = Path(config["state"]), Path(config["out"])
    resume = find_state(state_dir) if not config.get("fresh") else None
    torch.manual_seed(recipe.seed)
    if resume is not None:
        model = load_checkpoint(resume, device=device, dtype=torch.float32).train()
        if model.cfg != cfg:
            raise ValueError(f"{resume} holds a different model config than preset {recipe.preset!r}")
    else:
        model = build_model(cfg, device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=recipe.betas)
    step, history = 0, []
    if resume is not None:
        st = torch.load(resume / STATE_FILE, map_location=device, weights_only=False)
        opt.load_state_dict(st["optimizer"])
        step, history = st["step"], st["history"]
        say(f"[train] resuming from {resume} at step {step}")

    root = Path(recipe.data)
    files = sorted((root / "train").glob("*.parquet"))
    if config.get("limit"):
        files = files[: config["limit"]]
    mine = files[rank::world]
    t_load = time.perf_counter()
    dialogues = load_dialogues(mine, cfg)
    counts = torch.zeros(len(CONTROLS), dtype=torch.float64)
    for d in dialogues:
        counts += torch.bincount(d.targets["ctrl"], minlength=len(CONTROLS)).double()
    if world > 1:  # collectives run on the training device (NCCL wants CUDA tensors)
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    ctrl_weight = control_weights(counts)
    say(f"[train] {len(files)} dialogues ({len(mine)} on rank 0, read in {time.perf_counter() - t_load:.1f} s), "
        f"{world} worker(s) x {torch.get_num_threads()} thread(s) on {device}, "
        f"{model.num_params() / 1e6:.2f} M parameters ({model.num_params(active=True) / 1e6:.2f} M active)")
    say("[train] control weights " + ", ".join(f"{c} {w:.2f} ({n / counts.sum():.1%})" for c, w, n in zip(CONTROLS, ctrl_weight.tolist(), counts.tolist()) if n))

    builder = InputBuilder(cfg, device)
    params = [p for p in model.parameters()]
    per_worker = recipe.batch // world
    log_every, save_every_s = config.get("log_every", 10), config.get("save_every_s", 300.0)
    t_start = t_saved = time.perf_counter()
    step0, sums, n_sum = step, {k: 0.0 for k in ("loss", *PARTS)}, 0
    stop = min(recipe.steps, config.get("stop_at") or recipe.steps)  # stop_at: end early, as an interruption would
    while step < stop:
        rng = np.random.default_rng([recipe.seed, rank, step])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        for g in opt.param_groups:
            g["lr"] = recipe.lr_at(step)
        opt.zero_grad(set_to_none=False)
        for _ in range(per_worker):
            d = dialogues[int(rng.integers(len(dialogues)))]
            inp, tgt = window(builder, d, rng, recipe)
            inp, tgt = inp.to(device), {k: v.to(device) for k, v in tgt.items()}
            if step >= recipe.self_feed_from and rng.random() < recipe.self_feed:
                controls = 0 < recipe.self_feed_controls_from <= step
                inp = feed_back_own_speech(model, builder, inp, tgt, gen, controls)
            parts = loss_parts(model, inp, tgt, ctrl_weight, gen)
            (parts["loss"] / per_worker).backward()
            for k in sums:
                sums[k] += parts[k].item() / per_worker
        n_sum += 1
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            off = 0
            for p, g in zip(params, grads):
                p.grad = flat[off:off + g.numel()].view_as(g)
                off += g.numel()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, recipe.clip))
        opt.step()
        step += 1

        if step % log_every == 0 or step == recipe.steps:
            means = torch.tensor([sums[k] / n_sum for k in sums], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(means)
                means /= world
            m = dict(zip(sums, means.tolist()))
            rate = (step - step0) / (time.perf_counter() - t_start)
            eta = (recipe.steps - step) / max(rate, 1e-9)
            history.append({"step": step, **{k: round(v, 4) for k, v in m.items()}, "lr": recipe.lr_at(step - 1), "grad_norm": round(gnorm, 3),
                            "t": round(time.time(), 1)})
            say(f"[train] step {step}/{recipe.steps} ({step / recipe.steps:4.0%}) | loss {m['loss']:.3f} ctrl {m['ctrl']:.3f} "
                f"text {m['text']:.3f} flow {m['flow']:.3f} aux {m['balance']:.3f} | gnorm {gnorm:.2f} lr {recipe.lr_at(step - 1):.2e} "
                f"| {rate:.2f} step/s, eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            sums, n_sum = {k: 0.0 for k in sums}, 0
        due = time.perf_counter() - t_saved >= save_every_s
        if world > 1:  # every rank agrees on when to save (clocks differ a little)
            flag = torch.tensor([float(due)], device=device)
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        if due or step == stop:
            if rank == 0:
                model.eval()
                save_state(state_dir, out, model, opt, step, recipe, history)
                model.train()
                say(f"[train] saved step {step}: weights {out}, state {state_dir}")
            t_saved = time.perf_counter()
            if world > 1:
                dist.barrier()
    if ray_train is not None:
        try:
            ray_train.report({"step": step, **(history[-1] if history else {})})
        except Exception:
            pass
