"""A tiny evaluation of two held-out dialogues end to end through `interplay eval`."""

from __future__ import annotations

import json

from deployments.cli import main as cli_main
from training.generate import generate_set


def test_interplay_eval_two_heldout_dialogues(tmp_path, synth, capsys):
    generate_set(tmp_path / "synth", 0, 2, workers=0, cache_dir=synth.cache_dir.parent, progress=None)
    out, plot = tmp_path / "eval.json", tmp_path / "timeline.png"
    rc = cli_main(["eval", "--random", "--data", str(tmp_path / "synth" / "heldout"), "--out", str(out), "--plot", str(plot), "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "pause handling: take-over rate" in printed and "harness" in printed
    result = json.loads(out.read_text())
    assert result["dialogues"] == 2 and result["model"] == "tiny (random weights)"
    assert set(result["metrics"]) == {"model", "harness", "script"}
    script, harness = result["metrics"]["script"], result["metrics"]["harness"]
    assert script["pause"]["n"] >= 1 and script["pause"]["takeover_rate"] == 0.0  # the data holds its pauses
    assert script["turn_taking"]["takeover_rate"] > 0.5 and script["turn_taking"]["latency_s"] < 0.6
    assert harness["turn_taking"]["takeover_rate"] > 0.5 and harness["turn_taking"]["latency_s"] > script["turn_taking"]["latency_s"]
    assert set(result["per_dialogue"]) == {"synth-h1000000-turn_end", "synth-h1000001-pause"}
    assert result["timeline"]["session_id"] == "synth-h1000001-pause"
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in png[-12:]
