"""Build small WildChat-schema inputs for tests from the bundled sample's rows."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "wildchat" / "train-00000-of-00001.parquet"


def sample_schema() -> pa.Schema:
    return pq.read_schema(SAMPLE)


def sample_rows() -> list[dict[str, Any]]:
    """The 50 bundled rows as Python dicts (fresh copies each call)."""
    return pq.read_table(SAMPLE).to_pylist()


def good_row(index: int = 0) -> dict[str, Any]:
    """A well-formed, unflagged sample row (the role-order-broken ones are skipped)."""
    rows = [r for r in sample_rows() if [t["role"] for t in r["conversation"]][:1] == ["user"]
            and all(t["role"] == ("user" if i % 2 == 0 else "assistant") for i, t in enumerate(r["conversation"]))]
    return copy.deepcopy(rows[index])


def write_wildchat(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or sample_schema()), path)
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path
