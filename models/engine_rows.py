"""`EngineRows`: the sessions of a `StreamingEngine` and the batch rows that hold their state.

Each session's state is one row of pre-sized tensors plus a few host-side values
(models/session_state.py); live sessions occupy rows [0, n), so a tick reads contiguous views and
never copies a cache: a session joins at row n, and one that leaves has its row filled by the
last. `export_session` / `import_session` move a session's state between engines whose models
agree on everything the state means (`MATCHING`); a state that does not fit changes nothing.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from models.config import InteractionConfig
from models.inputs import InputBuilder
from models.session_state import Rows, Session
from models.step_checks import session_of
from protocols.chunks import ProtocolError, check_session_id

STATE_VERSION = 2


class EngineRows:
    """The sessions of `StreamingEngine`, which sets these attributes."""

    cfg: InteractionConfig
    inputs: InputBuilder
    rows: Rows
    max_sessions: int
    _sessions: dict[str, Session]
    _by_row: list[str]

    @property
    def sessions(self) -> list[str]:
        """Live session ids in row order: session i holds row i of every state tensor."""
        return list(self._by_row)

    def add_session(self, session_id: str, seed: int | None = None) -> None:
        self._can_add(session_id)
        row = len(self._by_row)
        seed = zlib.crc32(session_id.encode()) if seed is None else int(seed)
        self._sessions[session_id] = Session(session_id, seed, row)
        self._by_row.append(session_id)
        with torch.inference_mode():
            self.rows.reset(row)

    def remove_session(self, session_id: str) -> None:
        sess = self._get(session_id)
        last = len(self._by_row) - 1
        if sess.row != last:  # keep live rows contiguous: move the last row into the hole
            with torch.inference_mode():
                self.rows.move(last, sess.row)
            moved = self._sessions[self._by_row[last]]
            moved.row = sess.row
            self._by_row[sess.row] = moved.sid
        self._by_row.pop()
        del self._sessions[session_id]

    def push_update(self, session_id: str, text: str) -> None:
        """Queue a background update; it enters as its own stream on the following ticks."""
        sess = self._get(session_id)
        try:
            self.inputs.queue_update(sess.queues, text)
        except ProtocolError as e:
            raise ProtocolError(f"session {session_id!r}: {e}", e.code, e.param) from None

    def _get(self, session_id: Any) -> Session:
        return session_of(self._sessions, session_id)

    def _can_add(self, session_id: str) -> None:
        check_session_id(session_id)
        if session_id in self._sessions:
            raise ProtocolError(f"session {session_id!r} already exists", "duplicate_session", "session_id")
        if len(self._by_row) >= self.max_sessions:
            raise ProtocolError(f"engine is full ({self.max_sessions} sessions); cannot add {session_id!r}", "capacity", "session_id")

    # ---- state transfer ----
    MATCHING = ("tick_ms", "d_model", "n_layers", "n_kv_heads", "head_dim", "window", "n_sink", "n_mels", "mel_levels",
                "text_per_tick", "bg_per_tick", "frame_size", "patch", "text_out")  # what a session's state means

    def export_session(self, session_id: str) -> dict:
        """Everything needed to resume the session elsewhere: numpy arrays and plain values,
        picklable."""
        sess = self._get(session_id)
        with torch.inference_mode():
            rows = self.rows.export(sess.row)
        return {"version": STATE_VERSION, "config": self.cfg.to_dict(), "session": sess.export(), "rows": rows}

    def import_session(self, session_id: str, state: dict) -> None:
        """Add `session_id` resuming from `export_session` output (from this or another engine);
        a state that does not fit changes nothing."""
        if state.get("version") != STATE_VERSION:
            raise ProtocolError(f"session state version {state.get('version')!r} is not {STATE_VERSION}", "invalid_state", "state")
        mine, theirs = self.cfg.to_dict(), state.get("config", {})
        diff = [k for k in self.MATCHING if mine.get(k) != theirs.get(k)]
        if diff:
            raise ProtocolError(f"session state was made by a model with different {diff}", "invalid_state", "state")
        self.add_session(session_id, seed=state["session"]["seed"])
        row = self._sessions[session_id].row
        try:
            with torch.inference_mode():
                self.rows.load(row, state["rows"])
        except ProtocolError:
            self.remove_session(session_id)
            raise
        self._sessions[session_id] = Session.restore(session_id, row, state["session"])
