"""Forget one user: remove their rows from every table of a run, and say what cannot be.

`forget_user(run_dir, user_id)` walks the run's stage folders (round 0 and every
`round-<k>/`) for Parquet files with a `user_id` column (conversations, rejects,
followups, personas, users, rewrites, samples, pairs) and rewrites each file without that
user's rows. Each file is rewritten atomically: the new file is written beside it under a
name starting with "." (which pyarrow datasets skip) and moved over it with os.replace,
with the same schema, so a reader sees either the old file or the new one. A table of
several part files is consistent per file, not across files, while the command runs.

Trained weights cannot be untrained. The summary lists the train stages whose `pairs`
table held the user's rows in the train split, with their exported policy
(`train/model`) and Ray Train checkpoints (`train/storage/ray/checkpoint_*`), the later
rounds' train stages that started from such a policy, and the `reward_model` stage when
the user had kept train-split rewrites in round 0 (its training pairs). Those must be
retrained or deleted by the operator; this module deletes no weights.

With `chat_log` (`rlhi forget --chat-log DIR`, the folder of `serve.chat.log`), the user's
conversations are also removed from the chat app's log parts (`remove_from_chat_log`), under
the folder's lock so a running server's writer never interleaves; a server that is still up
may hold the user's newest turns in its open batch and write them later, so forget from its
log again after it stopped (or after `max_batch_seconds`).

What it records:
- each touched stage's `manifest.json` gains `"forgotten_users": n` (incremented per
  forgotten user), so resume logic can tell that the stage's `counts` and summary describe
  the tables before rows were removed, and that its outputs were edited after commit;
- `<run_dir>/forget.jsonl` gains one line per call: the user id, the time, the rows
  removed per table and the weights listed. The id is stored as tables hold it
  (`pipelines.schema.pseudonym`: a key that is not a hash already is stored as its SHA-256),
  so the log names which user was forgotten without carrying an e-mail or a name.
"""
from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import UserKey
from pipelines.contract import MANIFEST
from pipelines.schema import MODEL_FOLDER, pseudonym, round_dir, run_rounds, stage_dir, table_path
from pipelines.stages.ingest.served import SNAPSHOT
from pipelines.stages.ingest.checks import user_id as ingest_user_id

LOG = "forget.jsonl"
# Folders under a stage that hold no user tables: Ray Train's storage and exported models.
_SKIP_PARTS = {"storage", MODEL_FOLDER, "report"}
NOTE = ("Rows were removed from the run's tables, but weights cannot be untrained: the listed "
        "checkpoints and models were trained on this user's data. Retrain them without the user "
        "(rerun those stages) or delete them. Stage manifests marked `forgotten_users` have counts "
        "from before the removal.")


def forget_user(run_dir: Path, user_id: str, chat_log: Path | None = None) -> dict[str, Any]:
    """Remove every row of `user_id` from the run's tables (and from the chat log folder
    `chat_log`, when given); return what was done.

    Returns {"user_id", "rows_removed": {table path: n}, "total_rows_removed",
    "checkpoints_trained_on_user": [...], "derived_checkpoints": [...], "note"}, plus
    "chat_log_rows_removed" with `chat_log`; each checkpoint entry is
    {"stage": folder, "paths": [...]}.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist: pass the run_dir of a run")
    if chat_log is not None and not Path(chat_log).is_dir():
        raise FileNotFoundError(f"chat log folder {chat_log} does not exist: pass serve.chat.log.folder")
    files = user_tables(run_dir)
    trained, derived = trained_on_user(run_dir, user_id)  # read before the rows are gone

    removed: Counter[str] = Counter()
    touched_stages: set[Path] = set()
    for path in files:
        n = remove_rows(path, user_id)
        if n:
            removed[str(path.parent.relative_to(run_dir))] += n
            touched_stages.add(path.parent.parent)
    for folder in sorted(touched_stages):
        mark_manifest(folder)
    for k in run_rounds(run_dir):   # served_logs rounds' copies of the chat log's rows
        snapshot = round_dir(run_dir, k) / SNAPSHOT
        if snapshot.is_dir() and (n := remove_from_chat_log(snapshot, user_id)):
            removed[str(snapshot.relative_to(run_dir))] += n
            touched_stages.add(round_dir(run_dir, k) / "ingest")  # the stage it is published with

    total = sum(removed.values())
    user_id = pseudonym(user_id)   # an e-mail or a name given here is not written to forget.jsonl
    summary = {
        "user_id": user_id,
        "rows_removed": dict(sorted(removed.items())),
        "total_rows_removed": total,
        # stage folders whose files changed (relative to the run): what a run kept in object
        # storage republishes
        "stages_changed": sorted(str(folder.relative_to(run_dir)) for folder in touched_stages),
        "checkpoints_trained_on_user": trained,
        "derived_checkpoints": derived,
        "note": NOTE if total else f"user {user_id!r} has no rows in {run_dir}: nothing was removed.",
    }
    if chat_log is not None:
        n = summary["chat_log_rows_removed"] = remove_from_chat_log(Path(chat_log), user_id)
        summary["note"] += f" {n} conversations were removed from the chat log {chat_log}."
    record = {"time": datetime.now(timezone.utc).isoformat(), **summary}
    with open(run_dir / LOG, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return summary


def user_tables(run_dir: Path) -> list[Path]:
    """Parquet files of finished stages that have a `user_id` column."""
    found = []
    for path in sorted(run_dir.rglob("*.parquet")):
        parts = path.relative_to(run_dir).parts
        if any(p.startswith(".") for p in parts) or _SKIP_PARTS & set(parts[:-1]):
            continue  # unfinished stage folders (.tmp-), our own temp files, models, storage
        if "user_id" in pq.read_schema(path).names:
            found.append(path)
    return found


def user_mask(table: pa.Table, user_id: str) -> pa.ChunkedArray:
    """True on the user's rows; a null user_id is not the user. Tables hold the id ingest
    made of the user's key (`pseudonym`: the key itself when it is a hash), and runs ingested
    before keys were hashed hold the key: either is the user."""
    ids = pa.array(sorted({user_id, pseudonym(user_id)}), pa.string())
    return pc.fill_null(pc.is_in(table.column("user_id"), value_set=ids), False)


def remove_rows(path: Path, user_id: str) -> int:
    """Rewrite one Parquet file without the user's rows; the number removed (0: untouched)."""
    table = pq.read_table(path)
    mask = user_mask(table, user_id)
    n = pc.sum(mask).as_py() or 0
    if n:
        tmp = path.parent / f".{path.name}.forget-{uuid.uuid4().hex[:8]}"
        pq.write_table(table.filter(pc.invert(mask)), tmp)
        os.replace(tmp, path)
    return n


def chat_log_user_ids(hashed_ip: str | None) -> set[str]:
    """The user ids ingest may give a chat log row, one per `ingest.user_key` (the log
    records no headers, so the combined keys hash the `user` with empty ones)."""
    if not hashed_ip:
        return set()
    record = {"source_format": "wildchat", "user_parts": (hashed_ip, None, None)}
    return {ingest_user_id(record, key) for key in get_args(UserKey)}


def remove_from_chat_log(folder: Path, user_id: str) -> int:
    """Remove the conversations of `user_id` (as the request's `user`, or as the id ingest
    makes of it) from every part of a chat log folder (serve/chat_log.py), each part
    rewritten atomically; the number of conversations removed."""
    from serve.chat_log import SCHEMA, folder_lock, part_paths, write_table

    wanted = {user_id, pseudonym(user_id)}   # the key as given, or the id ingest makes of it
    removed = 0
    with folder_lock(folder):
        for path in part_paths(folder):
            table = pq.read_table(path, schema=SCHEMA)
            rows = table.select(["hashed_ip", "conversation"]).to_pylist()
            drop = [any(not wanted.isdisjoint({ip} | chat_log_user_ids(ip))
                        for ip in (row["hashed_ip"], *(t["hashed_ip"] for t in row["conversation"])))
                    for row in rows]
            if any(drop):
                removed += sum(drop)
                write_table(path, table.filter(pa.array([not d for d in drop])))
    return removed


def mark_manifest(folder: Path) -> None:
    """Add one to the stage manifest's `forgotten_users` (written atomically)."""
    path = folder / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text())
    manifest["forgotten_users"] = int(manifest.get("forgotten_users", 0)) + 1
    tmp = folder / f".{MANIFEST}.forget-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def user_rows(folder: Path, user_id: str, columns: list[str]) -> list[dict[str, Any]]:
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        return []
    table = pq.read_table(folder, columns=["user_id", *columns])
    return table.filter(user_mask(table, user_id)).to_pylist()


def weights(folder: Path) -> dict[str, Any]:
    """The weights a model-training stage folder holds."""
    paths = [folder / MODEL_FOLDER] if (folder / MODEL_FOLDER).exists() else []
    paths += sorted(p for p in (folder / "storage").rglob("checkpoint_*") if p.is_dir())
    return {"stage": str(folder), "paths": [str(p) for p in paths]}


def trained_on_user(run_dir: Path, user_id: str) -> tuple[list[dict], list[dict]]:
    """(stages trained on the user's rows, later train stages that started from one).

    A round's train stage trained on the user when its pairs table has the user's rows in
    the train split; round k > 0 starts from round k-1's policy (pipelines/rounds.py), so
    every later round inherits it. The reward model trains on round 0's kept rewrites of
    train-split users (pipelines/stages/train_reward_model.py).
    """
    trained, derived, tainted = [], [], False
    splits = {r["split"] for r in user_rows(table_path(run_dir, "personas", "users"), user_id, ["split"])}
    kept = [r for r in user_rows(table_path(run_dir, "rewrites", "rewrites"), user_id, ["status"])
            if r["status"] == "kept"]
    if "train" in splits and kept and stage_dir(run_dir, "reward_model").is_dir():
        trained.append(weights(stage_dir(run_dir, "reward_model")))
    for k in run_rounds(run_dir):
        train = stage_dir(run_dir, "train", k)
        if not train.is_dir():
            continue
        pairs = user_rows(table_path(run_dir, "pairs", "pairs", k), user_id, ["split"])
        if any(r["split"] == "train" for r in pairs):
            trained.append(weights(train))
            tainted = True
        elif tainted:
            derived.append(weights(train))
    return trained, derived


def forgotten_users(run_dir: Path) -> list[str]:
    """Every user `forget_user` has removed from this run (from `forget.jsonl`)."""
    log = Path(run_dir) / LOG
    if not log.is_file():
        return []
    users = [json.loads(line)["user_id"] for line in log.read_text().splitlines() if line.strip()]
    return sorted(set(users))


def reapply_forgets(run_dir: Path, folder: Path) -> int:
    """Remove forgotten users from a stage that was just (re)built: a rerun of ingest reads
    the raw logs again, and forgetting must outlive it. Returns the rows removed."""
    users = forgotten_users(run_dir)
    if not users or not Path(folder).is_dir():
        return 0
    removed = 0
    for path in sorted(Path(folder).rglob("*.parquet")):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") for p in parts) or _SKIP_PARTS & set(parts[:-1]):
            continue
        if "user_id" in pq.read_schema(path).names:
            removed += sum(remove_rows(path, user) for user in users)
    if removed:
        mark_manifest(Path(folder))
    # A served_logs round's ingest read its copy of the chat log, which may hold rows of a
    # user forgotten since (the log kept them, or the user chatted again): it goes too.
    snapshot = Path(folder).parent / SNAPSHOT
    if Path(folder).name == "ingest" and snapshot.is_dir():
        removed += sum(remove_from_chat_log(snapshot, user) for user in users)
    return removed
