"""The failover run's log check: each call's session log read back and replayed alone.

`check_logs` reads each session's log from the session log actor: its indices and ticks must run
in order with no duplicate, and a fresh engine stepping the session by itself from the logged
inputs alone must produce the logged outputs, controls and text exactly and audio level within
1 %; ticks whose waveform equals the logged one within `lsb` are counted, not required.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


async def check_logs(app, session_ids: list[str | None], lsb: int) -> dict:
    """Each session's log in order, and its outputs equal to a fresh engine's from its inputs."""
    from actors.interaction.interaction import EngineSpec
    from deployments.plan import engine_spec
    from protocols import InputChunk, OutputChunk
    from protocols.background import SessionEvent
    from protocols.deltas import from_table

    spec: EngineSpec = engine_spec(app.config)
    out: dict[str, Any] = {
        "sessions": 0, "ordered": 0, "gaps": 0, "ticks_compared": 0, "control_or_text_mismatches": 0, "level_mismatches": 0,
        "audio_exact_ticks": 0, "audio_max_diff": 0,
    }
    for sid in session_ids:
        if sid is None:
            continue
        try:
            recovery = await app.log.recovery.remote(sid, take_over=False)
            table = await app.log.read.remote(sid, recovery.log_token)
        except Exception as exc:  # closed under a live call (it should not be), or unreadable
            out.setdefault("unreadable", []).append(f"{sid}: {str(exc).splitlines()[-1][:120]}")
            continue
        deltas = from_table(table)
        indices = table.column("index").to_pylist()
        inputs = [d for d in deltas if isinstance(d, InputChunk)]
        outputs = {d.seq: d for d in deltas if isinstance(d, OutputChunk)}
        seqs = [c.seq for c in inputs]
        out["sessions"] += 1
        out["ordered"] += int(indices == sorted(set(indices)) and seqs == sorted(set(seqs)))
        out["gaps"] += sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
        back = [(a, b) for a, b in zip(seqs, seqs[1:]) if b <= a]
        if back:  # where it went wrong: the steps back, and who joined, resumed or released the call when
            events = [(i, d.type, d.data) for i, d in zip(indices, deltas) if isinstance(d, SessionEvent)]
            out.setdefault("disorder", {})[sid] = {"steps_back": back[:8], "events": events[:12]}
        engine = dataclasses.replace(spec, device="cpu", max_sessions=1).build()
        engine.add_session(sid)
        for chunk in inputs:
            outs, _ = engine.step([chunk])
            logged = outputs.get(chunk.seq)
            if logged is None or not outs:
                continue
            mine = outs[0]
            out["ticks_compared"] += 1
            if mine.controls != logged.controls or mine.text != logged.text:
                out["control_or_text_mismatches"] += 1
            a, b = _level(mine.audio), _level(logged.audio)
            if abs(a - b) > 0.01 * max(a, b) + 1e-4:
                out["level_mismatches"] += 1
            diff = int(np.abs(mine.audio.astype(np.int32) - logged.audio.astype(np.int32)).max()) if len(mine.audio) else 0
            out["audio_max_diff"] = max(out["audio_max_diff"], diff)
            out["audio_exact_ticks"] += int(diff <= lsb)
    return out


def _level(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)) / 32768) if len(audio) else 0.0
