"""Input files for ingest: finding them, checking them, splitting them into read tasks, and
reading one task into plain records.

Two formats:
- **WildChat Parquet** in the Hub's exact schema (WildChat-1M; WildChat-4.8M, whose
  timestamps carry no time zone and whose turns carry extra fields).
- **Chat JSONL**, one conversation a line:
  `{"user_id": ..., "timestamp": ..., "messages": [{"role": ..., "content": ...}], "language"?: ...}`.

Files are checked on the driver before any work starts (Parquet footer and schema; JSONL
is split at line boundaries), so a bad file fails fast with its name. Rows are read only in
the workers, a task (a row group, a slice of one, or a byte range of lines) at a time.
"""
from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import TIMESTAMP

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# Columns ingest needs from a WildChat file; the rest are ignored (the source file and
# row index keep the lineage back to them).
# Files re-saved by pyarrow or polars may hold large (64-bit offset) strings and lists: read
# as the ordinary ones.
_is_string = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
_is_list = lambda t: pa.types.is_list(t) or pa.types.is_large_list(t)  # noqa: E731
WILDCHAT_REQUIRED = {
    "conversation_hash": _is_string, "model": _is_string, "timestamp": pa.types.is_timestamp,
    "conversation": _is_list, "language": _is_string, "hashed_ip": _is_string,
}
TURN_REQUIRED = {"role": _is_string, "content": _is_string}
# Turn fields read when present: checked before any work starts, where a bad file can be
# skipped (`ingest.skip_bad_files`), not in a worker halfway through the stage.
TURN_OPTIONAL = {"timestamp": pa.types.is_timestamp, "turn_identifier": pa.types.is_integer}
JSONL_CHUNK_BYTES = 16 << 20


class InputError(ValueError):
    """An input file that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class ReadTask:
    """One unit of ingest work: a slice of one input file."""

    task_id: int            # position in input order; part files are named after it
    path: str
    format: str             # "wildchat" or "jsonl"
    row_group: int = -1     # Parquet: the row group, and a slice of it
    start: int = 0          # Parquet: first row in the row group; JSONL: byte offset
    stop: int = 0           # Parquet: end row in the row group; JSONL: end byte offset
    first_index: int = 0    # the file-level row (Parquet) or line (JSONL) number of the first row

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def resolve_inputs(inputs: list[str] | tuple[str, ...]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of input files."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in PARQUET_SUFFIXES + JSONL_SUFFIXES)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            matches = [path] if path.is_file() else []
        if not matches:
            raise InputError(f"input {item!r}: no such file, folder or matching files "
                             f"(relative paths are read from {Path.cwd()})")
        found.extend(matches)
    return list(dict.fromkeys(p.resolve() for p in found))


def detect_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "wildchat"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise InputError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                     "name it .parquet or .jsonl, or set ingest.format")


def check_wildchat_schema(schema: pa.Schema, path: Path) -> None:
    """Fail with the file's name unless it has the WildChat columns ingest needs."""
    problems = []
    for name, is_ok in WILDCHAT_REQUIRED.items():
        if name not in schema.names:
            problems.append(f"missing column {name!r}")
        elif not is_ok(schema.field(name).type):
            problems.append(f"column {name!r} has type {schema.field(name).type}")
    if not problems:
        turn = schema.field("conversation").type.value_type
        if not pa.types.is_struct(turn):
            problems.append(f"conversation turns are {turn}, not structs")
        else:
            for name, is_ok in TURN_REQUIRED.items():
                index = turn.get_field_index(name)
                if index < 0:
                    problems.append(f"turns have no field {name!r}")
                elif not is_ok(turn.field(index).type):
                    problems.append(f"turn field {name!r} has type {turn.field(index).type}")
            for name, is_ok in TURN_OPTIONAL.items():
                index = turn.get_field_index(name)
                if index >= 0 and not (is_ok(turn.field(index).type) or pa.types.is_null(turn.field(index).type)):
                    problems.append(f"turn field {name!r} has type {turn.field(index).type}")
    if problems:
        raise InputError(f"{path}: not in WildChat's schema: {'; '.join(problems)}. "
                         "Expected the Hub's WildChat-1M/4.8M Parquet (or set ingest.format: jsonl)")


def plan_file(path: Path, fmt: str, task_id: int, rows_per_task: int) -> list[ReadTask]:
    """Check one file and split it into read tasks numbered from `task_id`."""
    if fmt == "jsonl":
        return _plan_jsonl(path, task_id)
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{path}: cannot read as Parquet ({exc}); is the file truncated, "
                         "or not Parquet at all?") from None
    check_wildchat_schema(schema, path)
    tasks, first = [], 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        for start in range(0, rows, rows_per_task):
            stop = min(rows, start + rows_per_task)
            tasks.append(ReadTask(task_id + len(tasks), str(path), fmt, group, start, stop, first + start))
        first += rows
    return tasks


def _plan_jsonl(path: Path, task_id: int) -> list[ReadTask]:
    """Split a JSONL file at line boundaries into chunks, counting lines as it goes."""
    tasks, start, line = [], 0, 0
    size = path.stat().st_size
    with open(path, "rb") as handle:
        while start < size:
            handle.seek(start)
            block = handle.read(JSONL_CHUNK_BYTES)
            end = start + len(block)
            if end < size:
                extra = handle.readline()  # finish the last line of the chunk
                end += len(extra)
                block += extra
            tasks.append(ReadTask(task_id + len(tasks), str(path), "jsonl", -1, start, end, line))
            line += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            start = end
    return tasks


# --- reading one task into records -------------------------------------------------------

def read_wildchat_table(task: ReadTask) -> pa.Table:
    table = pq.ParquetFile(task.path).read_row_group(task.row_group)
    table = table.slice(task.start, task.stop - task.start)
    ordinary = pa.schema([field.with_type(_ordinary(field.type)) for field in table.schema])
    return table if ordinary.equals(table.schema) else table.cast(ordinary)


def _ordinary(kind: pa.DataType) -> pa.DataType:
    """`kind` with large strings and lists as the ordinary ones, nested types included."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_large_list(kind) or pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_ordinary(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_ordinary(field.type)) for field in kind])
    return kind


def _any_true(lists: pa.Array, field: str) -> np.ndarray:
    """Per row: does any element of this list-of-structs column have `field` true?"""
    mask = np.zeros(len(lists), dtype=bool)
    if field not in [f.name for f in lists.type.value_type]:
        return mask
    values = pc.fill_null(pc.struct_field(lists.flatten(), field), False)
    hits = pc.list_parent_indices(lists).filter(values).to_numpy()
    mask[hits] = True
    return mask


def _turn_array(conversation: pa.ListArray) -> pa.ListArray:
    """Keep the turn fields ingest uses, timestamps in UTC (4.8M's carry no time zone)."""
    turns = conversation.flatten()
    fields = []
    for name, kind in (("role", pa.string()), ("content", pa.string()),
                       ("timestamp", TIMESTAMP), ("turn_identifier", pa.int64())):
        index = turns.type.get_field_index(name)
        # Nanosecond timestamps (some exports) are cut to microseconds, not refused.
        column = (turns.field(index).cast(kind, safe=kind != TIMESTAMP) if index >= 0
                  else pa.nulls(len(turns), kind))
        fields.append(column)
    struct = pa.StructArray.from_arrays(fields, ["role", "content", "timestamp", "turn_identifier"],
                                        mask=turns.is_null())
    offsets = pc.subtract(conversation.offsets, conversation.offsets[0])
    return pa.ListArray.from_arrays(offsets, struct, mask=conversation.is_null())


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def wildchat_records(table: pa.Table, source_file: str, first_index: int) -> Iterator[dict[str, Any]]:
    """Plain records from rows in WildChat's Hub schema (one per row, none dropped). A row
    whose strings are not valid UTF-8 becomes a record carrying the error (rejected as
    `invalid_text`, naming the row), the others are read as usual."""
    try:
        records = list(_wildchat_records(table, source_file, first_index))
    except UnicodeDecodeError as exc:
        if table.num_rows > 1:   # find the row(s): read one by one
            records = [record for i in range(table.num_rows)
                       for record in wildchat_records(table.slice(i, 1), source_file, first_index + i)]
        else:
            records = [{"source_file": source_file, "source_index": first_index, "source_format": "wildchat",
                        "conversation_hash": None,
                        "error": ("invalid_text", f"row {first_index}: a string is not valid UTF-8 ({exc.reason} "
                                                  f"at byte {exc.start}); re-encode the file as UTF-8")}]
    yield from records


def _wildchat_records(table: pa.Table, source_file: str, first_index: int) -> Iterator[dict[str, Any]]:
    table = table.combine_chunks()
    conversation = table.column("conversation").chunk(0) if table.num_rows else pa.array([], table.schema.field("conversation").type)
    flagged = _any_true(table.column("openai_moderation").combine_chunks(), "flagged") \
        if "openai_moderation" in table.column_names else np.zeros(table.num_rows, bool)
    turn_toxic = _any_true(conversation, "toxic")
    headers = _column(table, "header")
    cols = {name: _column(table, name) for name in
            ("conversation_hash", "model", "language", "hashed_ip", "toxic", "redacted", "country", "state")}
    timestamps = table.column("timestamp").cast(TIMESTAMP, safe=False).to_pylist()
    turns = _turn_array(conversation).to_pylist()
    for i in range(table.num_rows):
        header = headers[i] or {}
        yield {
            "source_file": source_file, "source_index": first_index + i, "source_format": "wildchat",
            "conversation_hash": cols["conversation_hash"][i], "user_id": None,
            "user_parts": (cols["hashed_ip"][i], header.get("user-agent"), header.get("accept-language")),
            "timestamp": timestamps[i], "model": cols["model"][i], "language": cols["language"][i],
            "system": None, "turns": turns[i],
            "toxic": bool(cols["toxic"][i]) or bool(turn_toxic[i]) or bool(flagged[i]),
            "wildchat_redacted": bool(cols["redacted"][i]),
            "country": cols["country"][i], "state": cols["state"][i], "hashed_ip": cols["hashed_ip"][i],
            "error": None,
        }


def parse_timestamp(value: Any) -> datetime | None:
    """ISO 8601 text or seconds since the epoch, in UTC (no time zone means UTC)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, ValueError, OSError):   # NaN, inf, years past 9999
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def jsonl_records(data: bytes, source_file: str, first_index: int) -> Iterator[dict[str, Any]]:
    """Plain records from chat JSONL lines; a line that is not a JSON object becomes a
    record carrying the error, so it is rejected and counted, never lost."""
    for offset, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        record: dict[str, Any] = {"source_file": source_file, "source_index": first_index + offset,
                                  "source_format": "jsonl", "error": None}
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            row, record["error"] = {}, ("invalid_json", f"line {first_index + offset + 1}: {exc}")
        if not isinstance(row, dict):
            row, record["error"] = {}, ("invalid_json", f"line {first_index + offset + 1}: not a JSON object")
        messages = row.get("messages")
        system = None
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) \
                and messages[0].get("role") == "system":
            system, messages = messages[0].get("content"), messages[1:]
        turns = None if not isinstance(messages, list) else [
            {"role": m.get("role"), "content": m.get("content"), "timestamp": None, "turn_identifier": None}
            if isinstance(m, dict) else None for m in messages]
        digest = hashlib.md5(json.dumps(row.get("messages"), sort_keys=True, default=str).encode()).hexdigest()
        record.update({
            "conversation_hash": digest, "user_id": row.get("user_id"), "user_parts": None,
            "timestamp": parse_timestamp(row.get("timestamp")), "raw_timestamp": row.get("timestamp"),
            "model": row.get("model"), "language": row.get("language"), "system": system,
            "turns": turns, "toxic": bool(row.get("toxic", False)), "wildchat_redacted": False,
            "country": None, "state": None, "hashed_ip": None,
        })
        yield record


def read_task_records(task: ReadTask) -> Iterator[dict[str, Any]]:
    """All records of one read task, in input order."""
    if task.format == "jsonl":
        with open(task.path, "rb") as handle:
            handle.seek(task.start)
            data = handle.read(task.stop - task.start)
        yield from jsonl_records(data, task.path, task.first_index)
    else:
        yield from wildchat_records(read_wildchat_table(task), task.path, task.first_index)
