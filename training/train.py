"""Train an interaction model on the synthetic dialogues with Ray Train: `interplay train`.

One command reproduces the shipped `tiny` model: it generates `data/synth` if it is absent
(`training.generate`), then trains with a `TorchTrainer` (CPU workers here, one GPU per worker
where the cluster has GPUs) and writes the weights to `--out` (`models.checkpoint`: config.json +
model.safetensors, what `interplay serve` loads).

A step is a batch of dialogue windows: random crops of `crop_s` seconds (a quarter of them from
the dialogue's first tick, so the attention sinks also see session starts), each built by
`models.inputs.InputBuilder.session` exactly as the engine would have built it tick by tick, and
teacher-forced through the model's loss; from `self_feed_from` on, a share `self_feed` of them
hear their own sampled speech (and, from step `self_feed_controls_from`, their own chosen controls) fed back
instead of the data's (`feed_back_own_speech`), as they will when serving. Workers split the training dialogues, each takes
`batch / workers` windows a step and gradients are averaged across them. The control loss is
weighted by inverse square-root class frequency, capped at 3x (silence dominates; "yield" and
"delegate" are rare), the text loss ignores the padding after a tick's end-of-text. AdamW, linear warmup then
cosine decay to `min_lr_frac`.

Everything random is a function of (seed, worker rank, step): the windows, the flow-matching
noise. A run is resumable: every `save_every_s` seconds (and at the end) rank 0 writes the
weights to `--out` and the full training state (weights, optimizer, step, recipe) to `--state`;
rerunning the command continues from there and draws the very same windows as an uninterrupted
run would. The state directory must be visible to every worker (local disk here, shared storage
on a multi-node cluster).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import CONTROLS, InteractionConfig
from models.inputs import InputBuilder
from models.model import InteractionModel, TickInputs, build_model
from models.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from training import data

STATE_FILE = "train_state.pt"
RECIPE_FILE = "recipe.json"
PARTS = ("ctrl", "text", "flow", "balance")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (paths and worker layout aside)."""

    preset: str = "tiny"
    data: str = "data/synth"
    n_train: int = 1200  # dialogues generated when `data` is absent
    n_heldout: int = 120
    steps: int = 1600
    batch: int = 8  # dialogue windows per step, over all workers
    crop_s: tuple[float, float] = (10.0, 20.0)
    from_start: float = 0.25  # share of windows starting at the dialogue's first tick
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    self_feed: float = 0.75  # share of windows that hear the model's own speech fed back (feed_back_own_speech)
    self_feed_from: int = 300  # from this step on, once its speech head says something
    self_feed_controls_from: int = 0  # from this step on (0: never), those windows also hear the controls it chose (greedy, as served)
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        p = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


# ---- data ----
@dataclass
class Dialogue:
    session: data.Session
    targets: dict[str, torch.Tensor]


def load_dialogues(paths: list[Path], cfg: InteractionConfig) -> list[Dialogue]:
    from models.features import DMel, FeatureConfig
    from training import data

    dmel = DMel(FeatureConfig(n_mels=cfg.n_mels, levels=cfg.mel_levels, tick_ms=cfg.tick_ms))
    out = []
    for p in paths:
        s = data.read(p)
        if s.tick_ms != cfg.tick_ms:
            raise ValueError(f"{p}: tick {s.tick_ms} ms, the model's is {cfg.tick_ms} ms")
        out.append(Dialogue(s, data.targets(s, cfg.text_out, dmel)))
    return out


def crop_inputs(inp: TickInputs, a: int, b: int) -> TickInputs:
    """Rows [a, b) of a session's `TickInputs`."""
    rows = [r for r in inp.video_rows if a <= r < b]
    patches = inp.patches[[inp.video_rows.index(r) for r in rows]] if rows and inp.patches is not None else None
    return TickInputs(inp.mel_codes[a:b], inp.self_codes[a:b], inp.prev_ctrl[a:b], inp.prev_text[a:b], inp.tick[a:b],
                      patches, [r - a for r in rows], inp.text_ids[a:b], inp.bg_ids[a:b])


def window(builder: InputBuilder, d: Dialogue, rng: np.random.Generator, recipe: Recipe) -> tuple[TickInputs, dict[str, torch.Tensor]]:
    """One random window of a dialogue: its inputs (built from the session's first tick, so the
    dMel context, fed-back outputs, clock and text queues are the engine's) and targets."""
    k, tick_s = d.session.n_ticks, builder.cfg.tick_s
    n = int(round(rng.uniform(*recipe.crop_s) / tick_s))
    n = min(n, k)
    a = 0 if rng.random() < recipe.from_start else int(rng.integers(0, k - n + 1))
    b = a + n
    t = d.targets
    full = builder.session(d.session.inputs[:b], t["ctrl"][:b], t["text"][:b], t["mel"][:b], d.session.updates)
    return crop_inputs(full, a, b), {name: v[a:b] for name, v in t.items()}


def control_weights(counts: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """Inverse square-root frequency relative to the commonest control, at most `cap` (1 for
    controls never seen), scaled so the mean over the targets is 1. The cap keeps a greedy choice
    honest: weighting a control by w moves its decision threshold by w, and an uncapped rare
    "delegate" would win every ambiguous reply onset."""
    f = counts.double() / counts.sum().clamp_min(1)
    w = torch.where(counts > 0, (f.max() / f.clamp_min(1e-12)).sqrt().clamp(max=cap), torch.ones_like(f))
    return (w / (f * w).sum().clamp_min(1e-12)).float()


def feed_back_own_speech(model: InteractionModel, builder: InputBuilder, inp: TickInputs, tgt: dict[str, torch.Tensor],
                         generator: torch.Generator, controls: bool = False) -> TickInputs:
    """The window with what the model hears itself say replaced by its own: a pass without
    gradients on the true history samples its speech for every tick, and each tick's fed-back
    codes become the previous tick's sample. Serving feeds back what the model actually said,
    rougher than the data's voice; a model that only ever heard the clean voice leans on it to
    know where it is in a turn and loses its place in free running (scheduled sampling, one step
    deep). With `controls`, the control it chose there (greedy, as the engine does) is fed back
    too, and its speech muted where that control is "silent" (else where the target's is), while
    the targets stay the data's: a model that missed the moment to stop, or started in a pause,
    learns to stop on the next tick, instead of trusting its own last control to say where it is."""
    with torch.no_grad():
        x, out_pos = model.sequence(inp)
        h, _ = model.transformer.forward_full(x, torch.arange(x.shape[1], device=x.device))
        noise = torch.randn(tgt["mel"].shape, generator=generator).to(h)
        mel = model.sample_mel(h[0, out_pos], noise)
        ctrl = model.predict(h[0, out_pos])[0].argmax(-1) if controls else tgt["ctrl"]
        silent = (ctrl == CONTROLS.index("silent")).to(mel.device)[:, None, None]
        codes = builder.dmel.quantize(torch.where(silent, torch.full_like(mel, model.cfg.mel_floor), mel).float())
    fed = inp.self_codes.clone()
    fed[1:] = codes[:-1].to(fed.dtype)
    if not controls:
        return dataclasses.replace(inp, self_codes=fed)
    prev = inp.prev_ctrl.clone()
    prev[1:] = ctrl[:-1].to(prev.dtype)
    return dataclasses.replace(inp, self_codes=fed, prev_ctrl=prev)


# ---- the loss ----
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


# ---- training state ----
def save_state(state_dir: Path, out: Path, model: InteractionModel, opt: torch.optim.Optimizer, step: int, recipe: Recipe,
               history: list[dict], out_dtype: torch.dtype = torch.bfloat16) -> None:
    """Atomically: the weights to `out` in `out_dtype`, the training state to `state_dir`."""
    for final, write in ((state_dir, lambda p: _write_state(p, model, opt, step, recipe, history)),
                         (out, lambda p: save_weights(model, p, out_dtype))):
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def save_weights(model: InteractionModel, path: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The weights as served, in `dtype` (bfloat16 halves the file; the CPU engine computes in float32)."""
    shipped = build_model(model.cfg, "cpu", dtype)
    shipped.load_state_dict({k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()})
    return save_checkpoint(shipped, path)


def _write_state(path: Path, model, opt, step, recipe, history) -> None:
    save_checkpoint(model, path)
    torch.save({"step": step, "optimizer": opt.state_dict(), "history": history}, path / STATE_FILE)
    (path / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")


def find_state(state_dir: Path) -> Path | None:
    """The last complete training state (a save interrupted midway leaves the previous one)."""
    for p in (state_dir, state_dir.with_name(state_dir.name + ".old")):
        if (p / STATE_FILE).is_file() and (p / RECIPE_FILE).is_file():
            return p
    return None


def same_recipe(a: dict, b: dict) -> list[str]:
    """Recipe fields that differ, `steps` aside (a run may be extended)."""
    norm = lambda d: {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()}  # noqa: E731
    a, b = norm(a), norm(b)
    return sorted(k for k in set(a) | set(b) if k != "steps" and a.get(k) != b.get(k))


# ---- the per-worker loop ----
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


def load_engine(checkpoint: str | Path = "checkpoints/tiny", max_sessions: int = 1, device: str = "cpu", **kw):
    """A `models.engine.StreamingEngine` on trained weights, as `interplay serve` builds it."""
    from models.engine import StreamingEngine

    return StreamingEngine(load_checkpoint(checkpoint, device=device), max_sessions=max_sessions, device=device, **kw)


# ---- the command ----
def ensure_data(recipe: Recipe, workers: int) -> None:
    root = Path(recipe.data)
    if (root / "manifest.json").is_file() and any((root / "train").glob("*.parquet")):
        return
    from training.generate import generate_set
    from training.script import DialogueConfig

    print(f"[train] generating {recipe.n_train} + {recipe.n_heldout} dialogues into {root}", flush=True)
    generate_set(root, recipe.n_train, recipe.n_heldout, cfg=DialogueConfig.from_model(InteractionConfig.preset(recipe.preset)),
                 workers=max(1, workers))


def _quiet_cleaner_warnings() -> None:
    """Worker setup hook: Ray Train's placement-group cleaner polls the state API, which a cluster
    started without the dashboard lacks, and would warn every few seconds for the whole run. The
    local cluster `run` starts is shut down with the run, so nothing is left for it to clean."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def run(recipe: Recipe, out: str | Path, state: str | Path, *, workers: int = 2, threads: int = 1, use_gpu: bool | None = None,
        resume: str = "auto", save_every_s: float = 300.0, log_every: int = 10, limit: int = 0, ray_address: str | None = None) -> Path:
    """Train (or continue) and return the weights' directory. resume: "auto" (continue when a
    state exists), "require" (refuse to start over), "fresh" (discard any state)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out, state = Path(out).resolve(), Path(state).resolve()
    recipe = dataclasses.replace(recipe, data=str(Path(recipe.data).resolve()))
    found = find_state(state)
    if resume == "fresh":
        for p in (state, state.with_name(state.name + ".old")):
            shutil.rmtree(p, ignore_errors=True)
        found = None
    elif found is None and resume == "require":
        raise FileNotFoundError(f"no training state under {state} to resume")
    if found is not None:
        diff = same_recipe(json.loads((found / RECIPE_FILE).read_text()), {**recipe.to_dict(), "data": recipe.data})
        diff = [k for k in diff if k != "data"]
        if diff:
            raise ValueError(f"{found} was trained with a different recipe ({', '.join(diff)}); pass --fresh to start over")
        st = torch.load(found / STATE_FILE, map_location="cpu", weights_only=False)
        if st["step"] >= recipe.steps:
            print(f"[train] {found} is already at step {st['step']} of {recipe.steps}", flush=True)
            save_weights(load_checkpoint(found), out)
            return out

    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.ERROR,
                 num_cpus=None if ray_address else max(os.cpu_count() or 1, workers),
                 runtime_env=None if ray_address else {"worker_process_setup_hook": _quiet_cleaner_warnings})
    try:
        ensure_data(recipe, workers)
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        if use_gpu:
            workers = int(gpus)
        config = {"recipe": recipe.to_dict(), "out": str(out), "state": str(state), "threads": threads, "use_gpu": use_gpu,
                  "save_every_s": save_every_s, "log_every": log_every, "limit": limit}
        trainer = TorchTrainer(
            train_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}),
            run_config=RunConfig(name=f"interplay-train-{recipe.preset}", storage_path=str(state.parent / "ray")),
        )
        trainer.fit()
    finally:
        if started:
            ray.shutdown()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Recipe()
    p.add_argument("--out", default="checkpoints/tiny", help="where the trained weights go (default checkpoints/tiny)")
    p.add_argument("--state", help="training state for resuming (default data/train/<out's name>)")
    p.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset})")
    p.add_argument("--data", default=d.data, help=f"dialogue set, generated if absent (default {d.data})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"dialogue windows per step (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    p.add_argument("--workers", type=int, default=2, help="Ray Train CPU workers (default 2; one per GPU where there are GPUs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints (default 300)")
    p.add_argument("--address", help="join an existing Ray cluster instead of starting one")
    p.add_argument("--self-feed-controls", type=int, nargs="?", const=d.self_feed_from, default=d.self_feed_controls_from, metavar="STEP",
                   help=f"from STEP on (default {d.self_feed_from}), self-fed windows also hear the controls the model chose "
                        f"(off in the shipped recipe; see the README)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint; refuse if there is none "
                   "(without it a run continues when it finds one, and starts afresh otherwise)")
    g.add_argument("--fresh", action="store_true", help="discard any training state and start over")


def main_args(args: argparse.Namespace) -> int:
    recipe = Recipe(preset=args.preset, data=args.data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                    self_feed_controls_from=args.self_feed_controls)
    state = args.state or str(Path("data/train") / Path(args.out).name)
    t = time.perf_counter()
    try:
        out = run(recipe, args.out, state, workers=args.workers, threads=args.threads, save_every_s=args.save_every,
                  resume="require" if args.resume else "fresh" if args.fresh else "auto", ray_address=args.address)
    except (FileNotFoundError, ValueError) as exc:
        print(f"interplay train: {exc}", file=sys.stderr)
        return 2
    print(f"[train] done in {time.perf_counter() - t:.0f} s: {out}", flush=True)
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m training.train") -> int:
    p = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").partition("\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
