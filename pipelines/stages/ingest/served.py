"""A served_logs round's input: the chat log's rows that arrived since the rounds before.

`online.source: served_logs` makes each online round k learn from what the chat app logged
(serve/chat_log.py). The chat log holds one row per conversation, as of its latest turn: a
conversation that continues in a later batch gets a new row (with all its turns) in a newer
part, and its older row is removed; `rlhi forget` rewrites parts too, and a part number can
come back after the highest part was emptied. So "new" is decided per row, not per file
name: a row is new when no earlier round read its conversation with as many turns.

What each round read is its ledger, `<run_dir>/round-<k>/ingest/served.json`, written into
the ingest stage's output and committed with it (pipelines/contract.py StageWriter): a
round that crashed before its ingest committed has read nothing, and its rerun takes the
rows again, so nothing is read twice and nothing is skipped, across restarts.

    {"folder": "/abs/logs/chat", "rows": 5,
     "parts": [{"part": "part-000003.parquet", "rows": 2, "conversations": {"c-17": 4, "c-18": 2}}]}

(`conversations`: the log's `conversation_hash`, the client's conversation id, and how many
messages its row held when read.) The rows taken are copied, under the log folder's lock,
into `<run_dir>/round-<k>/served/` with the part names they had, so ingest reads a stable
snapshot while the server keeps writing, and lineage (`source_file`) names a file that stays.

Turns an earlier round already read are not feedback or prompts again: `earlier_turns` gives,
per conversation id, how many turns earlier rounds' ingest held, and the rewrites and rewards
stages take only turns from that index on (pipelines/rounds.py `new_turns`).
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import round_dir, stage_dir

LEDGER = "served.json"
SNAPSHOT = "served"


def ledger_path(run_dir: Path | str, round_index: int) -> Path:
    return stage_dir(run_dir, "ingest", round_index) / LEDGER


def read_ledgers(run_dir: Path | str, before_round: int) -> dict[str, int]:
    """conversation_hash -> the most messages any committed round in 1..before_round-1 read
    of it."""
    seen: dict[str, int] = {}
    for k in range(1, before_round):
        path = ledger_path(run_dir, k)
        if not path.is_file():
            continue
        for part in json.loads(path.read_text())["parts"]:
            for conversation, messages in part["conversations"].items():
                seen[conversation] = max(seen.get(conversation, 0), messages)
    return seen


def new_rows(table: pa.Table, seen: dict[str, int]) -> pa.Array:
    """Mask of the rows of one log part that are new: a conversation no earlier round read,
    or read with fewer messages than this row holds."""
    hashes = table.column("conversation_hash").to_pylist()
    lengths = pc.list_value_length(table.column("conversation")).to_pylist()
    return pa.array([(length or 0) > seen.get(h, 0) for h, length in zip(hashes, lengths)], pa.bool_())


def take_new_rows(folder: Path | str, run_dir: Path | str, round_index: int) -> dict[str, Any]:
    """Copy the log's new rows (against rounds before `round_index`) into the round's
    snapshot folder, replacing one a crashed attempt left; returns the round's ledger (not
    yet committed: `run_ingest` writes it into its stage output)."""
    from serve.chat_log import SCHEMA, folder_lock, part_paths

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"online.logs: {folder} is not a folder; point it at the chat app's "
                                "serve.chat.log.folder (the server creates it when it logs its first batch)")
    seen = read_ledgers(run_dir, round_index)
    snapshot = round_dir(run_dir, round_index) / SNAPSHOT
    building = snapshot.with_name(f".{SNAPSHOT}.tmp-{uuid.uuid4().hex[:8]}")
    building.mkdir(parents=True)
    ledger: dict[str, Any] = {"folder": str(folder), "rows": 0, "parts": []}
    try:
        with folder_lock(folder):
            for path in part_paths(folder):
                table = pq.read_table(path, schema=SCHEMA)
                table = table.filter(new_rows(table, seen))
                if table.num_rows == 0:
                    continue
                pq.write_table(table, building / path.name)
                lengths = pc.list_value_length(table.column("conversation")).to_pylist()
                ledger["parts"].append({"part": path.name, "rows": table.num_rows, "conversations": dict(
                    zip(table.column("conversation_hash").to_pylist(), lengths))})
                ledger["rows"] += table.num_rows
        if not ledger["parts"]:
            pq.write_table(SCHEMA.empty_table(), building / "part-none.parquet")
        shutil.rmtree(snapshot, ignore_errors=True)
        building.rename(snapshot)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ledger


def round_input(folder: Path | str, run_dir: Path | str, round_index: int) -> dict[str, Any]:
    """The round's ledger, its snapshot in place: a round whose ingest committed before (a
    rerun: a setting or code upstream changed) reads again exactly the rows it read then,
    from its own snapshot; else it takes the log's new rows (`take_new_rows`). Taking new
    rows on a rerun would also take the rows later rounds read, and leave them nothing."""
    from pipelines.contract import read_manifest

    snapshot = round_dir(run_dir, round_index) / SNAPSHOT
    ledger = ledger_path(run_dir, round_index)
    if read_manifest(run_dir, "ingest", round_index) is not None and ledger.is_file() and snapshot.is_dir():
        return json.loads(ledger.read_text())
    return take_new_rows(folder, run_dir, round_index)


def earlier_turns(run_dir: Path | str, rounds: list[int]) -> dict[str, int]:
    """conversation_id -> the most turns the ingest of `rounds` (pipelines/rounds.py
    `ingest_rounds`, the ones before the reading round) held of it: a conversation's turns
    below that index were read (and learned from) before."""
    from pipelines.schema import CONVERSATIONS, table_path

    held: dict[str, int] = {}
    for k in rounds:
        table = pq.read_table(table_path(run_dir, "ingest", "conversations", k), schema=CONVERSATIONS,
                              columns=["conversation_id", "turns"])
        for cid, n in zip(table.column("conversation_id").to_pylist(),
                          pc.list_value_length(table.column("turns")).to_pylist()):
            held[cid] = max(held.get(cid, 0), n or 0)
    return held
