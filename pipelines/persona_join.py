"""The persona each turn sees, and each user's split: reading the personas stage's output.

A turn is joined to the latest non-serving snapshot of its user made strictly before it
(`join_personas`), so a persona never contains the turn it conditions or anything after.
Used by every stage that conditions on personas (rewrites, rewards, evaluate) and by the
simulation; a shared helper, not a stage.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import table_path


def join_personas(turns: pd.DataFrame, personas: pa.Table) -> pd.Series:
    """For rows with `user_id` and `time`, the persona_id of the latest non-serving
    snapshot of that user whose as_of is strictly earlier than `time`."""
    snaps = personas.filter(pc.invert(personas.column("serving"))) \
                    .select(["user_id", "as_of", "persona_id"]).to_pandas()
    left = turns[["user_id", "time"]].reset_index().sort_values("time")
    merged = pd.merge_asof(left, snaps.sort_values("as_of"), left_on="time", right_on="as_of",
                           by="user_id", allow_exact_matches=False, direction="backward")
    return merged.set_index("index")["persona_id"].reindex(turns.index)


def turn_times(conversation_timestamp: datetime, turn: dict[str, Any]) -> datetime:
    """When a turn happened: its own timestamp where the log has one, else its conversation's."""
    return turn.get("timestamp") or conversation_timestamp


def attach_personas(frame: pd.DataFrame, run_dir: Path | str, *, user_agnostic: bool) -> pd.DataFrame:
    """Add `persona_id` and `persona` to rows with `user_id` and `time`: the latest snapshot
    built strictly before the turn. User-agnostic runs get none."""
    frame = frame.copy()
    if user_agnostic or frame.empty:
        frame["persona_id"], frame["persona"] = None, ""
        return frame
    personas = pq.read_table(table_path(run_dir, "personas", "personas"))
    frame["persona_id"] = join_personas(frame, personas)
    text = dict(zip(personas.column("persona_id").to_pylist(), personas.column("persona").to_pylist()))
    frame["persona"] = [text.get(pid, "") if isinstance(pid, str) else "" for pid in frame["persona_id"]]
    frame["persona_id"] = [pid if isinstance(pid, str) else None for pid in frame["persona_id"]]
    return frame


def user_splits(run_dir: Path | str) -> dict[str, str]:
    """user_id -> "train" or "eval" (the personas stage's split by user)."""
    users = pq.read_table(table_path(run_dir, "personas", "users"), columns=["user_id", "split"])
    return dict(zip(users.column("user_id").to_pylist(), users.column("split").to_pylist()))
