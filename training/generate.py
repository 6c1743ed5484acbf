"""Generate a synthetic dialogue set in parallel with Ray: `python -m training.generate --out data/synth`.

The set is `<out>/train/` and `<out>/heldout/` (Parquet logs plus JSON labels, see training.data)
and `<out>/manifest.json`. Scenarios take turns in `CYCLE` (the first eight cover them all); held-out
dialogues use seeds from `HELDOUT_SEED0` on and voices (espeak variants) never used in training.
Dialogues are Ray tasks in batches; `--workers 0` generates in this process instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.dialogues import generate
from training.scenarios import SCENARIOS
from training.script import DialogueConfig
from training.voices import DEFAULT_CACHE, Synth

HELDOUT_SEED0 = 1_000_000
# The order scenarios take turns in: every scenario once, then the four of turn-taking proper again,
# as the tiny model needs most data where the aims are (pauses, turn ends, interruptions, backchannels).
CYCLE = SCENARIOS + ("turn_end", "pause", "interruption", "backchannel")


def plan(n_train: int, n_heldout: int, seed0: int = 0) -> list[tuple[str, int, str]]:
    """(split, seed, scenario) for every dialogue of the set; seeds of the two splits never meet."""
    if not 0 <= seed0 < HELDOUT_SEED0 - n_train:
        raise ValueError(f"seed0 must be in [0, {HELDOUT_SEED0 - n_train})")
    jobs = [("train", seed0 + i, CYCLE[i % len(CYCLE)]) for i in range(n_train)]
    jobs += [("heldout", HELDOUT_SEED0 + seed0 + i, CYCLE[i % len(CYCLE)]) for i in range(n_heldout)]
    return jobs


def run_batch(jobs: list[tuple[str, int, str]], out: str, cache_dir: str | None, cfg: DialogueConfig) -> list[dict]:
    """Generate and save `jobs`; one summary per dialogue."""
    from training.data import save

    synth = Synth(cache_dir)
    done = []
    for split, seed, scenario in jobs:
        t = time.perf_counter()
        d = generate(seed, scenario, split, cfg, synth)
        path = save(d, Path(out) / split)
        done.append({"split": split, "seed": seed, "scenario": scenario, "session_id": d.session_id,
                     "path": str(Path(split) / path.name), "duration_s": d.labels["duration_s"],
                     "seconds": time.perf_counter() - t})
    return done


def generate_set(out: str | Path, n_train: int, n_heldout: int, *, seed0: int = 0, cfg: DialogueConfig = DialogueConfig(),
                 cache_dir: str | Path | None = DEFAULT_CACHE, workers: int = 2, batch: int = 8, progress=sys.stderr) -> dict:
    """Generate the set and write its manifest; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(n_train, n_heldout, seed0)
    batches = [jobs[i:i + batch] for i in range(0, len(jobs), batch)]
    cache = None if cache_dir is None else str(Path(cache_dir).resolve())
    t0, results = time.perf_counter(), []

    def report(final: bool = False) -> None:
        if progress is None:
            return
        audio = sum(r["duration_s"] for r in results)
        rate = len(results) / max(time.perf_counter() - t0, 1e-9)
        progress.write(f"\rgenerated {len(results)}/{len(jobs)} dialogues, {audio / 60:.1f} min of audio, {rate:.1f}/s"
                       + ("\n" if final else ""))
        progress.flush()

    if workers <= 0:
        for b in batches:
            results += run_batch(b, str(out), cache, cfg)
            report()
    else:
        import ray

        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        try:
            task = ray.remote(num_cpus=1)(run_batch)
            pending = [task.remote(b, str(out), cache, cfg) for b in batches]
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                results += ray.get(ready[0])
                report()
        finally:
            if started:
                ray.shutdown()
    report(final=True)
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: (r["split"], r["seed"]))
    manifest = {
        "config": cfg.__dict__, "seed0": seed0, "wall_s": round(wall, 2), "workers": workers,
        "splits": {split: [r["path"] for r in results if r["split"] == split] for split in ("train", "heldout")},
        "scenarios": {split: {s: sum(1 for r in results if r["split"] == split and r["scenario"] == s) for s in SCENARIOS}
                      for split in ("train", "heldout")},
        "audio_s": {split: round(sum(r["duration_s"] for r in results if r["split"] == split), 1) for split in ("train", "heldout")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.generate", description=(__doc__ or "").partition("\n")[0])
    p.add_argument("--out", default="data/synth", help="output folder (default data/synth)")
    p.add_argument("--train", type=int, default=1200, help="training dialogues (default 1200)")
    p.add_argument("--heldout", type=int, default=120, help="held-out dialogues (default 120)")
    p.add_argument("--seed", type=int, default=0, help="first training seed (default 0)")
    p.add_argument("--preset", default="tiny", help="model preset whose tick and text shapes the data follows (default tiny)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="rendered-speech cache ('' for none; default data/cache)")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs (0: no Ray, this process; default 2)")
    p.add_argument("--batch", type=int, default=8, help="dialogues per Ray task (default 8)")
    args = p.parse_args(argv)
    if args.train < 0 or args.heldout < 0:
        p.error("--train and --heldout must be >= 0")
    from models.config import InteractionConfig

    try:
        cfg = DialogueConfig.from_model(InteractionConfig.preset(args.preset))
    except KeyError as exc:
        p.error(str(exc))
    m = generate_set(args.out, args.train, args.heldout, seed0=args.seed, cfg=cfg, cache_dir=args.cache or None,
                     workers=args.workers, batch=args.batch)
    print(json.dumps({"out": args.out, "wall_s": m["wall_s"], "audio_s": m["audio_s"], "scenarios": m["scenarios"]["train"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
