"""Interaction quality on held-out dialogues, Full-Duplex-Bench style, for the model and a VAD harness.

`evaluate(data_dir, checkpoint)` runs every dialogue of a split (training.data logs) tick by tick
through `models.engine.StreamingEngine`, the engine that serves, several dialogues as sessions of
one engine, faster than real time (outputs depend on ticks, not on wall time). The same dialogues
also go through `VADHarness`, the conventional design: Silero VAD endpointing (500 ms of silence
ends the user's turn) and barge-in (the first window of detected speech stops playback), in front
of a turn-based responder that replays, in the model's voice, the script's reply to the user turn
it just heard (audio and text of the dialogue's own model outputs; an oracle for content, so only
its timing is on trial). Both hear the user's channel causally, one tick at a time, and their
output for tick k plays during tick k+1. The script itself (the model channel the data asks for)
is scored alongside, as the reference the rules give to the intended behaviour.

The rules are in `training.eval_metrics`; the systems run in `training.eval_harness`; the table and
the timeline image are `training.eval_report`'s. `python -m training.evaluate` (`interplay eval`)
runs it all and writes the JSON result and the image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.eval_harness import ENDPOINT_MS, run_harness, run_model, run_script
from training.eval_metrics import (
    HOLD_AFTER_S, MERGE_GAP_S, SPEAKING_SLACK_S, SYSTEMS, TAKEOVER_S, TIMING_TOL_S, load_vad, score_dialogue, speech_segments,
    summarize,
)
from training.eval_report import plot_timeline, table


def evaluate(data_dir: str | Path = "data/synth/heldout", checkpoint: str | Path | None = None, preset: str = "tiny",
             limit: int | None = None, batch: int = 8, plot_session: str | None = None, progress=sys.stderr,
             onset_margin: float | None = None) -> dict:
    """Run and score the model (a checkpoint, or `preset`'s random weights if None) and the
    harness on a split; returns the JSON-able result, with per-dialogue events and, under
    "timeline", the speech of one dialogue (`plot_session`, default the first pause dialogue).
    `onset_margin`: the engine's (None: the checkpoint's calibrated one, as serving uses)."""
    from models.engine import StreamingEngine
    from training.data import read

    paths = sorted(Path(data_dir).glob("*.parquet"))[:limit]
    if not paths:
        raise FileNotFoundError(f"no dialogues in {data_dir} (python -m training.generate makes them)")
    sessions = [read(p) for p in paths]
    from models.checkpoint import load_checkpoint
    from models.checkpoint import onset_margin as margin_for

    margin = margin_for(checkpoint, onset_margin)
    if checkpoint:
        engine, source = StreamingEngine(load_checkpoint(checkpoint), max_sessions=batch, onset_margin=margin), str(checkpoint)
    else:
        engine, source = StreamingEngine(preset, max_sessions=batch, onset_margin=margin), f"{preset} (random weights)"
    if any(s.tick_ms != engine.tick_ms for s in sessions):
        raise ValueError(f"dialogues are not at the model's {engine.tick_ms} ms tick")
    audio_s = sum(s.labels.get("duration_s", s.n_ticks * s.tick_ms / 1000) for s in sessions)

    t = time.perf_counter()
    model_runs = run_model(engine, sessions, progress)
    model_wall = time.perf_counter() - t
    t = time.perf_counter()
    vad = load_vad()
    harness_runs = {}
    for s in sessions:
        harness_runs[s.labels["session_id"]] = run_harness(s, vad)
    harness_wall = time.perf_counter() - t

    per, results = {}, {name: [] for name in SYSTEMS}
    for s in sessions:
        sid = s.labels["session_id"]
        per[sid] = {"scenario": s.labels["scenario"]}
        for name, run in (("model", model_runs[sid]), ("harness", harness_runs[sid]), ("script", run_script(s))):
            segs = speech_segments(run.audio)
            res = score_dialogue(s.labels, segs, run)
            results[name].append(res)
            per[sid][name] = {"speech": [[round(a, 3), round(b, 3)] for a, b in segs], **{k: v for k, v in res.items() if v},
                              **({"notes": run.notes} if run.notes else {})}
    pick = plot_session or next((s.labels["session_id"] for s in sessions if s.labels["scenario"] == "pause"), sessions[0].labels["session_id"])
    ps = next((s for s in sessions if s.labels["session_id"] == pick), None)
    if ps is None:
        raise ValueError(f"no dialogue {pick!r} to plot among those evaluated")
    return {
        "data": str(data_dir), "model": source, "onset_margin": engine.onset_margin, "batch": batch, "dialogues": len(sessions), "audio_s": round(audio_s, 1),
        "rules": {"vad": "silero-vad defaults (threshold 0.5, min speech 250 ms, min silence 100 ms, pad 30 ms)",
                  "merge_gap_s": MERGE_GAP_S, "takeover_s": TAKEOVER_S, "hold_after_s": HOLD_AFTER_S,
                  "timing_tol_s": TIMING_TOL_S, "speaking_slack_s": SPEAKING_SLACK_S, "harness_endpoint_ms": ENDPOINT_MS},
        "wall_s": {"model": round(model_wall, 2), "harness": round(harness_wall, 2)},
        "real_time_factor": {"model": round(audio_s / max(model_wall, 1e-9), 1)},
        "metrics": {name: summarize(results[name]) for name in SYSTEMS},
        "timeline": {"session_id": pick, "duration_s": ps.labels["duration_s"], "user": ps.labels["user_speech"],
                     "script": per[pick]["script"]["speech"], "model": per[pick]["model"]["speech"], "harness": per[pick]["harness"]["speech"]},
        "per_dialogue": per,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="interplay eval", description="Full-Duplex-Bench-style metrics of the model and a VAD harness on held-out dialogues.")
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: checkpoints/tiny if present, else random weights)")
    p.add_argument("--random", action="store_true", help="evaluate --preset's random weights instead of a checkpoint")
    p.add_argument("--preset", default="tiny", help="preset for --random (default tiny)")
    p.add_argument("--data", default="data/synth/heldout", help="held-out dialogues (default data/synth/heldout)")
    p.add_argument("--out", default="bench/results/eval.json", help="JSON results (default bench/results/eval.json)")
    p.add_argument("--plot", default="bench/results/eval_timeline.png", help="timeline PNG ('' for none)")
    p.add_argument("--plot-session", default=None, help="dialogue to plot (default: the first pause dialogue)")
    p.add_argument("--limit", type=int, default=None, help="only the first N dialogues")
    p.add_argument("--batch", type=int, default=8, help="dialogues stepped together as sessions of one engine (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--onset-margin", type=float, default=None,
                   help="logits the model must be sure by to start speaking (default: the checkpoint's decision.json, as served)")


DEFAULT_CHECKPOINT = Path("checkpoints/tiny")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint
    if args.random:
        checkpoint = None
    elif checkpoint is None:
        if (DEFAULT_CHECKPOINT / "config.json").is_file():
            checkpoint = str(DEFAULT_CHECKPOINT)
        else:
            print(f"[eval] no checkpoint at {DEFAULT_CHECKPOINT}: evaluating {args.preset}'s random weights", file=sys.stderr)
    try:
        result = evaluate(args.data, checkpoint, args.preset, args.limit, args.batch, args.plot_session,
                          onset_margin=args.onset_margin)
    except (FileNotFoundError, ValueError) as exc:
        print(f"interplay eval: {exc}", file=sys.stderr)
        return 2
    print(table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"[eval] wrote {args.out}")
    if args.plot:
        how = plot_timeline(result["timeline"], args.plot)
        print(f"[eval] wrote {args.plot} ({how}; {result['timeline']['session_id']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
