"""Dialogues on disk, and what a training loop reads back from them.

A dialogue is two files in a split's folder: `<session_id>.parquet`, the session's log in
`protocols.deltas.SCHEMA` (zstd), and `<session_id>.json`, its labels. `read` turns the log back
into chunks (through `protocols.deltas.from_table`); `targets` gives the per-tick training
targets of `InteractionModel.loss`: the control index, the text as `text_out` token ids (the
tick's bytes, then EOT, then pad) and the log-mel of the model's own audio (dMel, streamed over
its whole channel). With `models.inputs.InputBuilder.session(chunks, ctrl, text, mel, updates)`
that is everything one teacher-forced step needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from protocols.background import BackgroundUpdate
from protocols.chunks import CONTROLS, InputChunk, OutputChunk
from protocols.deltas import from_table


def save(dialogue, out_dir: str | Path) -> Path:
    """Write a `training.dialogues.Dialogue`; returns the Parquet path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dialogue.session_id}.parquet"
    pq.write_table(dialogue.table(), path, compression="zstd")
    (out / f"{dialogue.session_id}.json").write_text(json.dumps(dialogue.labels, indent=1))
    return path


@dataclass
class Session:
    inputs: list[InputChunk]  # ticks 0..K-1
    outputs: list[OutputChunk]  # the model's answer for each tick (its audio plays a tick later)
    updates: dict[int, list[str]]  # background updates pushed just before tick k
    labels: dict
    tick_ms: int

    @property
    def n_ticks(self) -> int:
        return len(self.inputs)

    def model_channel(self) -> np.ndarray:
        """The model's audio as heard in real time: a tick of silence, then every output."""
        s = len(self.inputs[0].audio)
        return np.concatenate([np.zeros(s, np.int16)] + [o.audio for o in self.outputs])

    def user_channel(self) -> np.ndarray:
        return np.concatenate([c.audio for c in self.inputs])


def read(path: str | Path) -> Session:
    path = Path(path)
    deltas = from_table(pq.read_table(path))
    labels_path = path.with_suffix(".json")
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    inputs = [d for d in deltas if isinstance(d, InputChunk)]
    outputs = [d for d in deltas if isinstance(d, OutputChunk)]
    if [c.seq for c in inputs] != list(range(len(inputs))) or [o.seq for o in outputs] != [c.seq for c in inputs]:
        raise ValueError(f"{path}: ticks are not 0..K-1 with one input and one output each")
    tick_ms = int(labels.get("tick_ms") or round(len(inputs[0].audio) / 16))
    updates: dict[int, list[str]] = {}
    for d in deltas:
        if isinstance(d, BackgroundUpdate):
            updates.setdefault(int(round(d.t * 1000 / tick_ms)), []).append(d.text)
    return Session(inputs, outputs, updates, labels, tick_ms)


def targets(session: Session, text_out: int = 4, dmel=None) -> dict[str, torch.Tensor]:
    """Per tick: "ctrl" (K,) long, "text" (K, text_out) long, "mel" (K, F, M) float log-mel.
    `dmel`: a `models.features.DMel` for the model's tick (built from the session's tick if None)."""
    from models.features import DMel, FeatureConfig
    from models.tokenizer import ByteTokenizer

    tk = ByteTokenizer()
    if dmel is None:
        dmel = DMel(FeatureConfig(tick_ms=session.tick_ms))
    ctrl = torch.tensor([CONTROLS.index(o.controls[0]) if o.controls else CONTROLS.index("silent") for o in session.outputs])
    text = torch.full((session.n_ticks, text_out), tk.pad_id, dtype=torch.long)
    for k, o in enumerate(session.outputs):
        ids = tk.encode(o.text)
        if len(ids) > text_out:
            raise ValueError(f"tick {k} says {len(ids)} bytes, more than text_out={text_out}")
        text[k, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if len(ids) < text_out:
            text[k, len(ids)] = tk.eot_id
    audio = torch.from_numpy(np.concatenate([o.audio for o in session.outputs]))
    with torch.inference_mode():
        mel = dmel.logmel_full(audio)[0]  # (K * F, M): causal, so each tick's frames see only its past
    return {"ctrl": ctrl, "text": text, "mel": mel.reshape(session.n_ticks, -1, mel.shape[-1]).clone()}
