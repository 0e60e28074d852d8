"""Conversation capture: finished chat turns, redacted, as Parquet parts in WildChat's Hub schema.

`serve.chat.log` (pipelines/config/run.py ChatLogConfig) turns it on. The gateway hands every
finished `/v1/chat/completions` turn to `ChatLogWriter.add`; a batch of conversations is
written as one part when it holds `max_batch_conversations` or its oldest turn has waited
`max_batch_seconds`. A log folder holds

    part-000000.parquet, part-000001.parquet, ...  one per batch, numbered in batch order
    .part-000002.parquet.tmp                        a part being written
    .open-batch-000002                              ids of the open batch's conversations
    .lock                                           held while parts are written or rewritten
    .writer                                         held by the one writer of the folder

and keeps the stage contract (pipelines/contract.py) per file:
- a part is written under a temporary name (no `part-` prefix, no `.parquet` suffix, so
  neither a `part-*.parquet` glob nor ingest's folder walk sees it) and renamed when complete;
- one row per conversation (all turns sent with one `conversation_id`), as of its latest
  turn: a conversation that continues in a later batch gets a new row there, carrying its
  earlier turns' timestamps, turn ids and policy versions, and its older row is then removed
  from the older part (rewritten atomically, deleted once empty). A crash between the two
  leaves both rows; the next writer removes the older one when it starts;
- a crash loses at most the open batch: the next writer counts the conversations listed in
  the leftover `.open-batch-<n>` whose part never appeared (`recovered_lost`).

Rows are built by serve/chat_rows.py, which says what each WildChat field holds.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import pseudonym
from serve.chat_rows import (ChatTurn, Redacts, Snapshot, carry_over, redact_snapshot, snapshot_from_row,
                             snapshot_of, wildchat_row)
from sim.generate import SCHEMA  # WildChat's Hub schema, as the simulated logs have it

PART_GLOB = "part-*.parquet"
_PART = re.compile(r"^part-(\d+)\.parquet$")
_JOURNAL = re.compile(r"^\.open-batch-(\d+)$")
logger = logging.getLogger("rlhi.serve.chat_log")


# ---------------------------------------------------------------- the folder

def part_path(folder: Path, number: int) -> Path:
    return folder / f"part-{number:06d}.parquet"


def part_paths(folder: Path) -> list[Path]:
    """The complete parts, in batch order."""
    return sorted(p for p in Path(folder).glob(PART_GLOB) if _PART.match(p.name))


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive across processes: the writer's flush and `rlhi forget` never interleave."""
    with open(Path(folder) / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_table(path: Path, table: pa.Table) -> None:
    """Write (or replace) one part atomically: a temporary name, then a rename. An empty
    table deletes the part instead."""
    if table.num_rows == 0:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def drop_conversations(path: Path, conversation_ids: set[str]) -> None:
    """Rewrite one part without these conversations' rows."""
    table = pq.read_table(path, schema=SCHEMA)
    keep = [cid not in conversation_ids for cid in table.column("conversation_hash").to_pylist()]
    if not all(keep):
        write_table(path, table.filter(pa.array(keep)))


def index_parts(folder: Path) -> dict[str, Path]:
    """conversation_id -> the part holding its row; a row left twice by a crash between a
    part's write and the older part's rewrite is removed from the older part here."""
    index: dict[str, Path] = {}
    stale: dict[Path, set[str]] = {}
    for path in part_paths(folder):
        for cid in pq.read_table(path, columns=["conversation_hash"]).column(0).to_pylist():
            if cid in index:
                stale.setdefault(index[cid], set()).add(cid)
            index[cid] = path
    for path, cids in stale.items():
        drop_conversations(path, cids)
    return index


def conversation_owners(folder: Path) -> dict[str, str | None]:
    """conversation id -> the `user` whose conversation it is, over the folder's parts."""
    owners: dict[str, str | None] = {}
    for path in part_paths(folder):
        table = pq.read_table(path, columns=["conversation_hash", "hashed_ip"])
        owners.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist()))
    return owners


def user_scoped(conversation_id: str, user: str | None) -> str:
    """The log's id for a conversation whose id another user already holds: the id plus a
    hash of the user, so neither user's conversation replaces the other's."""
    digest = hashlib.sha256((user or "").encode("utf-8")).hexdigest()[:12]
    return f"{conversation_id}:{digest}"


def recover_lost(folder: Path) -> int:
    """Conversations of batches a killed writer left open (their part never appeared);
    the leftover journals are removed."""
    lost = 0
    for journal in sorted(Path(folder).iterdir()):
        match = _JOURNAL.match(journal.name)
        if not match:
            continue
        if not part_path(folder, int(match.group(1))).exists():
            lost += len(set(journal.read_text().split()))
        journal.unlink()
    for tmp in Path(folder).glob(".part-*.parquet.tmp"):
        tmp.unlink()
    return lost


def next_part_number(folder: Path) -> int:
    numbers = [int(_PART.match(p.name).group(1)) for p in part_paths(folder)]
    return max(numbers, default=-1) + 1


# ---------------------------------------------------------------- the writer

@dataclass
class _Batch:
    number: int
    opened: float
    journal: Any
    snapshots: dict[str, Snapshot] = field(default_factory=dict)


class ChatLogWriter:
    """Batches turns by conversation and writes each batch as one part (thread-safe).

    `add` is cheap (memory and one journal line); `flush` does the redaction and the I/O,
    so the serving replica runs it in a thread. `close` flushes and stops taking turns.
    """

    def __init__(self, folder: str | Path, redactor: Redacts, *, max_batch_conversations: int = 256,
                 max_batch_seconds: float = 60.0, language: str = "English",
                 clock: Any = time.monotonic, wait_for_folder_s: float = 0.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.redactor, self.language, self.clock = redactor, language, clock
        self.max_batch_conversations, self.max_batch_seconds = max_batch_conversations, max_batch_seconds
        self._owner = _own(self.folder, wait_for_folder_s)
        with folder_lock(self.folder):
            self.recovered_lost = recover_lost(self.folder)
            """Conversations a previous writer lost when it was killed mid-batch."""
            self._index = index_parts(self.folder)
            self._owners = conversation_owners(self.folder)
            self._next_number = next_part_number(self.folder)
        if self.recovered_lost:
            logger.warning("chat log %s: the previous writer stopped mid-batch; %d conversations "
                           "of its open batch were lost", self.folder, self.recovered_lost)
        self._last_turn_id = 0
        self._batch: _Batch | None = None
        self._lock = threading.Lock()        # guards the open batch
        self._flush_lock = threading.Lock()  # one flush at a time, in batch order
        self._closed = False
        self.written: set[str] = set()
        """Conversations this writer has written."""
        self.lost = 0
        """Conversations this writer failed to write (a failed flush, a turn after close)."""

    def add(self, turn: ChatTurn) -> bool:
        """Put a finished turn in the open batch; True when the batch is due for a flush."""
        with self._lock:
            if self._closed:
                self.lost += 1
                logger.error("chat log closed: a turn of one conversation was not recorded")
                return False
            if self._batch is None:
                number, self._next_number = self._next_number, self._next_number + 1
                journal = open(self.folder / f".open-batch-{number:06d}", "a")
                self._batch = _Batch(number, self.clock(), journal)
            batch = self._batch
            # Clients choose conversation ids: two users may send the same one ('my-chat-1'),
            # and their turns must neither replace nor join each other's conversation.
            turn = replace(turn, conversation_id=self._log_id(turn.conversation_id, turn.user))
            snapshot = snapshot_of(turn)
            earlier = batch.snapshots.get(turn.conversation_id)
            if earlier is not None:
                snapshot.turns = carry_over(snapshot.turns, earlier.turns)
            else:
                batch.journal.write(turn.conversation_id + "\n")
                batch.journal.flush()  # in the OS's hands now: a killed process still counts it
            batch.snapshots[turn.conversation_id] = snapshot
            return self._due(batch)

    def _log_id(self, cid: str, user: str | None) -> str:
        """The id the log keeps `user`'s conversation `cid` under: `cid` while no other user
        holds it, else `user_scoped`; once scoped, always scoped (even after the user who held
        `cid` was forgotten and the writer restarted). Keys compare by `pseudonym`, so logs
        written when the raw key was kept still match."""
        def same(owner: str | None) -> bool:
            return (owner and pseudonym(owner)) == (user and pseudonym(user))

        scoped = user_scoped(cid, user and pseudonym(user))
        if scoped in self._owners or not same(self._owners.setdefault(cid, user)):
            if not same(self._owners.setdefault(scoped, user)):
                raise ValueError(f"conversation id {scoped!r} belongs to another user")
            return scoped
        return cid

    def due(self) -> bool:
        """Whether the open batch is full or has waited `max_batch_seconds`."""
        with self._lock:
            return self._batch is not None and self._due(self._batch)

    def _due(self, batch: _Batch) -> bool:
        return (len(batch.snapshots) >= self.max_batch_conversations
                or self.clock() - batch.opened >= self.max_batch_seconds)

    def flush(self) -> int:
        """Write the open batch as the next part; the conversations written."""
        with self._flush_lock:
            with self._lock:
                batch, self._batch = self._batch, None
            if batch is None:
                return 0
            batch.journal.close()
            try:
                with folder_lock(self.folder):
                    self._write(batch)
            except Exception as exc:  # noqa: BLE001 - a failed write must not stop serving
                self.lost += len(batch.snapshots)
                logger.error("chat log: writing part %d failed (%s): %d conversations lost",
                             batch.number, type(exc).__name__, len(batch.snapshots))
                return 0
            finally:
                (self.folder / f".open-batch-{batch.number:06d}").unlink(missing_ok=True)
            return len(batch.snapshots)

    def _write(self, batch: _Batch) -> None:
        path = part_path(self.folder, batch.number)
        previous = self._read_previous(batch.snapshots)
        rows = []
        for cid, snapshot in batch.snapshots.items():
            snapshot = redact_snapshot(snapshot, self.redactor)
            if cid in previous:
                snapshot.turns = carry_over(snapshot.turns, previous[cid].turns)
            snapshot.turns = [t if t.turn_identifier is not None else replace(t, turn_identifier=self._turn_id())
                              for t in snapshot.turns]
            rows.append(wildchat_row(snapshot, self.language))
        write_table(path, pa.Table.from_pylist(rows, schema=SCHEMA))
        superseded: dict[Path, set[str]] = {}
        for cid in batch.snapshots:
            older = self._index.get(cid)
            if older is not None and older != path:
                superseded.setdefault(older, set()).add(cid)
            self._index[cid] = path
        for older, cids in superseded.items():
            if older.exists():
                drop_conversations(older, cids)
        self.written.update(batch.snapshots)

    def _read_previous(self, snapshots: dict[str, Snapshot]) -> dict[str, Snapshot]:
        """The rows already written for these conversations (a forget may have removed some)."""
        by_part: dict[Path, set[str]] = {}
        for cid in snapshots:
            if cid in self._index and self._index[cid].exists():
                by_part.setdefault(self._index[cid], set()).add(cid)
        previous = {}
        for path, cids in by_part.items():
            for row in pq.read_table(path, schema=SCHEMA).to_pylist():
                if row["conversation_hash"] in cids:
                    previous[row["conversation_hash"]] = snapshot_from_row(row)
        return previous

    def _turn_id(self) -> int:
        """Unique and increasing within the folder: microseconds since the epoch, bumped."""
        self._last_turn_id = max(self._last_turn_id + 1, time.time_ns() // 1000)
        return self._last_turn_id

    def close(self) -> dict[str, int]:
        """Flush the open batch and stop taking turns; {"written", "lost"} conversations."""
        with self._lock:
            already, self._closed = self._closed, True
        self.flush()
        if not already:
            self._owner.close()  # releases the folder for the next writer
        return {"written": len(self.written), "lost": self.lost}


def _own(folder: Path, wait_s: float = 0.0) -> Any:
    """Hold the folder for this writer's lifetime (released by the kernel if it dies): two
    writers would number parts and supersede rows over each other. Waits up to `wait_s` for
    a writer that is stopping (a replica Serve replaces starts before the old one has closed)."""
    handle = open(folder / ".writer", "a")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                raise RuntimeError(f"chat log folder {folder} is in use by another writer"
                                   + (f" (waited {wait_s:g} s)" if wait_s else "") + ": give each "
                                   "server its own serve.chat.log.folder") from None
            time.sleep(0.1)
