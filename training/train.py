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

Its parts: `recipe.py` (the recipe and schedule), `windows.py` (the training windows), `loss.py`,
`train_state.py` (saving and resuming) and `train_loop.py` (the per-worker loop); here the
command, which starts Ray Train over them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from models.checkpoint import load_checkpoint
from models.config import InteractionConfig
from training.recipe import Recipe
from training.train_loop import train_loop
from training.train_state import RECIPE_FILE, STATE_FILE, find_state, same_recipe, save_weights


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
