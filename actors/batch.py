"""Rows in, columns out: what lets one role class serve Ray Data and Ray Serve alike.

Ray Data hands an actor-pool callable a batch as `dict[str, np.ndarray]` or as a
`pyarrow.Table` (depending on `batch_format`); Serve calls the roles' plain methods. Roles
turn either batch into plain Python rows here, run their list method, and append their
output columns to the batch in the format it came in.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Sized

import numpy as np

Batch = Any  # dict[str, np.ndarray] | pyarrow.Table


def regroup(flat: Sequence[Any], groups: Sequence[Sized]) -> list[list[Any]]:
    """`flat` (one value per item of every group, in order) cut back into one list per group:
    the results of one model call over many requests' items, handed back per request."""
    out, k = [], 0
    for group in groups:
        out.append(list(flat[k:k + len(group)]))
        k += len(group)
    return out


def to_python(value: Any) -> Any:
    """Nested numpy arrays/scalars (Ray's numpy batches of list<struct> columns) -> lists."""
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


def batch_columns(batch: Batch, names: Sequence[str]) -> dict[str, list[Any]]:
    """The named columns of a batch as Python lists, with a clear error for a missing one."""
    import pyarrow as pa

    available = batch.column_names if isinstance(batch, pa.Table) else list(batch)
    missing = [n for n in names if n not in available]
    if missing:
        raise KeyError(f"batch lacks column(s) {missing}; it has {available}")
    if isinstance(batch, pa.Table):
        return {n: batch.column(n).to_pylist() for n in names}
    return {n: to_python(batch[n]) for n in names}


def with_columns(batch: Batch, columns: dict[str, list[Any]]) -> Batch:
    """`batch` plus `columns` (replacing same-named ones), in the batch's own format."""
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        for name, values in columns.items():
            array = pa.array(values)
            if name in batch.column_names:
                batch = batch.set_column(batch.column_names.index(name), name, array)
            else:
                batch = batch.append_column(name, array)
        return batch
    # Ray's numpy form of list<struct> columns (object arrays of arrays of dicts) does not
    # convert back to Arrow; plain lists inside object arrays do.
    out = {name: _object_array(to_python(col)) if col.dtype == object else col
           for name, col in batch.items()}
    for name, values in columns.items():
        is_nested = bool(values) and isinstance(values[0], (list, dict))
        out[name] = _object_array(values) if is_nested else np.asarray(values)
    return out


def _object_array(values: list[Any]) -> np.ndarray:
    # np.array would turn equal-length lists into a 2-D array: keep one object per row.
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def map_batch(batch: Batch, inputs: Sequence[str],
              fn: Callable[..., dict[str, list[Any]]]) -> Batch:
    """Call `fn(**input columns)` and append the columns it returns."""
    return with_columns(batch, fn(**batch_columns(batch, inputs)))
