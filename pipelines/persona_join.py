"""The persona each turn sees, and each user's split: reading the personas stage's output.

A turn sees the snapshot the personas stage assigned to its conversation
(`conversation_personas`): built only from the user's conversations before it, so a persona
never contains the turn it conditions, the rest of that conversation or anything later,
whatever the clocks say. Used by every stage that conditions on personas (rewrites,
rewards, evaluate) and by the simulation; a shared helper, not a stage.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import table_path


def join_personas(rows: pd.DataFrame, links: pa.Table) -> pd.Series:
    """For rows with `conversation_id`, the persona_id the personas stage assigned to that
    conversation (`conversation_personas` rows); NaN where the conversation has none."""
    by_conversation = dict(zip(links.column("conversation_id").to_pylist(), links.column("persona_id").to_pylist()))
    return rows["conversation_id"].map(by_conversation)


def attach_personas(frame: pd.DataFrame, run_dir: Path | str, *, user_agnostic: bool,
                    round_index: int = 0) -> pd.DataFrame:
    """Add `persona_id` and `persona` to rows with `conversation_id`: the snapshot built from
    the user's conversations before that one (the personas stage of `round_index`).
    User-agnostic runs get none."""
    frame = frame.copy()
    if user_agnostic or frame.empty:
        frame["persona_id"], frame["persona"] = None, ""
        return frame
    personas = pq.read_table(table_path(run_dir, "personas", "personas", round_index))
    links = pq.read_table(table_path(run_dir, "personas", "conversation_personas", round_index))
    frame["persona_id"] = join_personas(frame, links)
    text = dict(zip(personas.column("persona_id").to_pylist(), personas.column("persona").to_pylist()))
    frame["persona"] = [text.get(pid, "") if isinstance(pid, str) else "" for pid in frame["persona_id"]]
    frame["persona_id"] = [pid if isinstance(pid, str) else None for pid in frame["persona_id"]]
    return frame


def user_splits(run_dir: Path | str, round_index: int = 0) -> dict[str, str]:
    """user_id -> "train" or "eval" (the personas stage's split by user, of `round_index`)."""
    users = pq.read_table(table_path(run_dir, "personas", "users", round_index), columns=["user_id", "split"])
    return dict(zip(users.column("user_id").to_pylist(), users.column("split").to_pylist()))
