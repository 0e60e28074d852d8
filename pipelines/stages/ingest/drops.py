"""Duplicates and the per-user cap in bounded memory: the kept rows' keys, bucketed on disk.

A kept row is dropped when its conversation_id was kept earlier in input order
("duplicate"), or when its user already has `cap` earlier conversations ("user_cap"): the
user's first `cap` by conversation timestamp are kept (input order breaks ties), so which
ones survive does not depend on the order of the input files, and a persona is built from
the start of the user's history. Input order is (task_id, row), packed into one int64 `order`.

No process holds every row's keys. Four steps, each a plain function on one file or one
bucket, so the stage runs them as parallel Ray tasks (or one after another in-process):
1. `shard_keys`, per kept part: its rows' (order, conversation_id, user_id), split into
   buckets by conversation_id;
2. `find_duplicates`, per conversation bucket: every conversation_id's copies are in the
   same bucket, so the first in input order is known there; the others are written as
   drops, the survivors re-bucketed by user;
3. `apply_cap`, per user bucket: every conversation of a user is in the same bucket; the
   ones after the first `cap` by timestamp are drops. Returns the histogram of kept
   conversations per user (count -> users), all the summary needs;
4. the stage rewrites only the parts that lose rows, reading just their drops.
Memory per task is one bucket: the stage picks the bucket count from the row count.
"""
from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_BUCKET = 200_000
DROPS = pa.schema([("order", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])
_ROW_BITS = 32


def bucket_count(rows: int) -> int:
    return int(min(256, max(1, -(-rows // ROWS_PER_BUCKET))))


def order_of(task_id: int, rows: int) -> pa.Array:
    """The input-order key of a part's rows."""
    return pa.array((task_id << _ROW_BITS) + np.arange(rows, dtype=np.int64))


def task_range(task_id: int) -> tuple[int, int]:
    """[low, high) of the order keys of one task's rows."""
    return task_id << _ROW_BITS, (task_id + 1) << _ROW_BITS


def buckets_of(values: pa.ChunkedArray | pa.Array, buckets: int) -> np.ndarray:
    """A stable bucket per value (crc32 of the string), hashing each distinct value once."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
    per_value = np.array([zlib.crc32(v.encode()) % buckets for v in encoded.dictionary.to_pylist()], dtype=np.int64)
    return per_value[encoded.indices.to_numpy(zero_copy_only=False)] if len(per_value) else np.zeros(0, np.int64)


def write_buckets(table: pa.Table, buckets: np.ndarray, folder: Path, prefix: str, name: str) -> None:
    """Each bucket's rows of `table` to `<folder>/<prefix>-<b>/<name>.parquet` (none if empty)."""
    for bucket in np.unique(buckets):
        target = folder / f"{prefix}-{bucket:03d}"
        target.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(buckets == bucket)), target / f"{name}.parquet")


def shard_keys(part: str, task_id: int, keys_dir: str, buckets: int) -> int:
    """Step 1: one kept part's keys into conversation buckets; returns its rows."""
    table = pq.read_table(part, columns=["conversation_id", "user_id", "timestamp"])
    keys = table.append_column("order", order_of(task_id, table.num_rows))
    write_buckets(keys, buckets_of(keys.column("conversation_id"), buckets), Path(keys_dir), "cid",
                  f"task-{task_id:06d}")
    return table.num_rows


def find_duplicates(bucket_dir: str, keys_dir: str, drops_dir: str, buckets: int) -> int:
    """Step 2: drop every copy of a conversation_id after its first in input order; the
    survivors go to user buckets. Returns the duplicates found."""
    bucket = Path(bucket_dir)
    keys = pq.read_table(bucket).sort_by("order")
    first = np.zeros(keys.num_rows, dtype=bool)
    ids = pc.dictionary_encode(keys.column("conversation_id").combine_chunks()).indices.to_numpy()
    first[np.unique(ids, return_index=True)[1]] = True
    duplicates = keys.filter(pa.array(~first))
    detail = pc.binary_join_element_wise("conversation_id ", duplicates.column("conversation_id"),
                                         " was kept earlier in the input", "")
    write_drops(duplicates.column("order"), "duplicate", detail, Path(drops_dir) / f"{bucket.name}.parquet")
    survivors = keys.filter(pa.array(first)).select(["order", "user_id", "timestamp"])
    write_buckets(survivors, buckets_of(survivors.column("user_id"), buckets), Path(keys_dir), "user", bucket.name)
    return duplicates.num_rows


def apply_cap(bucket_dir: str, drops_dir: str, cap: int) -> dict[int, int]:
    """Step 3: drop each user's conversations after the first `cap` by timestamp (then input
    order); returns the histogram kept-conversations -> users of this bucket's users."""
    bucket = Path(bucket_dir)
    keys = pq.read_table(bucket).sort_by([("user_id", "ascending"), ("timestamp", "ascending"),
                                          ("order", "ascending")])
    users = pc.dictionary_encode(keys.column("user_id").combine_chunks()).indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(users)])
    rank = np.arange(len(users)) - np.repeat(starts, sizes)
    over = keys.filter(pa.array(rank >= cap))
    detail = pc.binary_join_element_wise("user ", over.column("user_id"), f" already has {cap} conversations", "")
    write_drops(over.column("order"), "user_cap", detail, Path(drops_dir) / f"{bucket.name}.parquet")
    return dict(Counter(np.minimum(sizes, cap).tolist()))


def write_drops(order: pa.ChunkedArray, reason: str, detail: pa.ChunkedArray, path: Path) -> None:
    if len(order):
        reasons = pa.array([reason] * len(order), pa.string())
        pq.write_table(pa.table([order, reasons, detail], schema=DROPS), path)


def read_drops(drops_dir: Path, task_id: int) -> pa.Table:
    """The drops of one task's rows, by row."""
    files = sorted(drops_dir.glob("*.parquet"))
    if not files:
        return DROPS.empty_table()
    low, high = task_range(task_id)
    return pq.read_table(files, schema=DROPS, filters=[("order", ">=", low), ("order", "<", high)])


def merge_histograms(histograms: list[dict[int, int]]) -> Counter:
    merged: Counter = Counter()
    for histogram in histograms:
        merged.update(histogram)
    return merged


def histogram_median(histogram: Counter) -> float:
    """The median of the values a histogram (value -> how many) describes."""
    total = sum(histogram.values())
    if not total:
        return 0
    wanted, seen, found = sorted({(total - 1) // 2, total // 2}), 0, []
    for value in sorted(histogram):
        seen += histogram[value]
        while wanted and wanted[0] < seen:
            found.append(value)
            wanted.pop(0)
    return found[0] if len(found) == 1 else (found[0] + found[1]) / 2
