"""Stage `ingest`: WildChat Parquet or chat JSONL -> `conversations` and `rejects`.

Top to bottom:
1. plan: check every input file on the driver and split it into read tasks
   (pipelines/stages/ingest/sources.py); a file that cannot be read fails here, naming it;
2. check: a Ray Data actor pool streams the tasks; per row, structure rules, filters and
   redaction (pipelines/stages/ingest/checks.py); each task writes its kept rows and rejects as Parquet
   parts, so row data never passes through the driver;
3. decide: on the driver, from the kept rows' keys alone (two short strings a row),
   duplicates (same conversation_id, the first in input order kept) and the per-user cap;
4. finalize: parts with no row to drop are moved as they are, the others rewritten; the
   stage folder is published atomically (pipelines/contract.py).

Every input row ends in exactly one place: `conversations`, or `rejects` with status
"filtered" (a configured filter) or "rejected" (malformed) and a reason; the summary
checks in = kept + filtered + rejected.

The run directory must be visible to every worker (local disk on one machine, a shared
file system on a cluster), since workers write their parts into it.
"""
from __future__ import annotations

import json
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.stages.ingest.checks import check_records, reject_row
from pipelines.config import IngestConfig, RunConfig
from pipelines.schema import REJECTS, stage_dir
from pipelines.stages.ingest.sources import InputError, ReadTask, detect_format, plan_file, read_task_records, resolve_inputs
from pipelines.contract import StageWriter, fingerprint

STAGE = "ingest"


# --- 1. plan ------------------------------------------------------------------------------

def plan(settings: IngestConfig) -> tuple[list[ReadTask], list[Path], list[dict[str, str]]]:
    """Read tasks in input order, the files they cover, and the bad files skipped."""
    tasks: list[ReadTask] = []
    files, bad_files = [], []
    for path in resolve_inputs(settings.inputs):
        try:
            tasks.extend(plan_file(path, detect_format(path, settings.format), len(tasks), settings.rows_per_task))
            files.append(path)
        except InputError as exc:
            if not settings.skip_bad_files:
                raise
            bad_files.append({"path": str(path), "error": str(exc)})
    return tasks, files, bad_files


# --- 2. check -----------------------------------------------------------------------------

def check_task(task: ReadTask, settings: IngestConfig, redactor, work: Path) -> dict[str, Any]:
    """Read one task, check its rows, write its two parts; return its counts."""
    try:
        result = check_records(read_task_records(task), settings, redactor)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{task.path}: failed while reading from row {task.first_index}: {exc}") from exc
    name = f"part-{task.task_id:06d}.parquet"
    pq.write_table(result.conversations, work / "kept" / name)
    pq.write_table(result.rejects, work / "rejects" / name)
    return {"task_id": task.task_id, "rows_in": result.rows_in, "redacted": json.dumps(result.redacted)}


class CheckWorker:
    """Ray Data callable class: builds the redactor once per actor, then checks tasks."""

    def __init__(self, settings_json: str, work: str) -> None:
        from pipelines.redact import Redactor

        self.settings = IngestConfig.model_validate_json(settings_json)
        self.redactor = Redactor(self.settings.redact)
        self.work = Path(work)

    def __call__(self, batch: pa.Table) -> pa.Table:
        results = [check_task(ReadTask(**row), self.settings, self.redactor, self.work) for row in batch.to_pylist()]
        return pa.Table.from_pylist(results)


def check_with_ray(tasks: list[ReadTask], settings: IngestConfig, work: Path,
                   progress_bars: bool = True) -> list[dict[str, Any]]:
    """Step 2 on Ray Data: one block per task, an actor pool as wide as the CPUs."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    workers = settings.workers or max(1, int(ray.available_resources().get("CPU", 1)))
    workers = min(workers, len(tasks))
    dataset = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=len(tasks))
    results = dataset.map_batches(
        CheckWorker, fn_constructor_kwargs={"settings_json": settings.model_dump_json(), "work": str(work)},
        batch_size=1, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=workers))
    return [row for batch in results.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()]


def check_in_process(tasks: list[ReadTask], settings: IngestConfig, work: Path) -> list[dict[str, Any]]:
    """Step 2 in this process, one task after another (tests; the baseline of bench/ingest.py)."""
    from pipelines.redact import Redactor

    redactor = Redactor(settings.redact)
    return [check_task(task, settings, redactor, work) for task in tasks]


# --- 3. decide ----------------------------------------------------------------------------

def decide_drops(keys: pa.Table, cap: int) -> dict[tuple[int, int], tuple[str, str]]:
    """The kept rows to drop, keyed by (task_id, row): a conversation_id seen earlier in
    input order, then a user's conversations beyond `cap`.

    `keys` has columns task_id, row, conversation_id, user_id, one row per kept row.
    """
    keys = keys.sort_by([("task_id", "ascending"), ("row", "ascending")])
    drops: dict[tuple[int, int], tuple[str, str]] = {}
    seen: set[str] = set()
    per_user: Counter = Counter()
    columns = (keys.column(name).to_pylist() for name in ("task_id", "row", "conversation_id", "user_id"))
    for task_id, row, cid, uid in zip(*columns):
        if cid in seen:
            drops[(task_id, row)] = ("duplicate", f"conversation_id {cid} was kept earlier in the input")
            continue
        seen.add(cid)
        per_user[uid] += 1
        if per_user[uid] > cap:
            drops[(task_id, row)] = ("user_cap", f"user {uid} already has {cap} conversations")
    return drops


def _part_keys(part: Path) -> pa.Table:
    table = pq.read_table(part, columns=["conversation_id", "user_id"])
    task_id = int(part.stem.split("-")[1])
    return table.append_column("task_id", pa.array([task_id] * table.num_rows, pa.int64())) \
                .append_column("row", pa.array(range(table.num_rows), pa.int64()))


# --- 4. finalize --------------------------------------------------------------------------

def finalize(work: Path, out: Path, cap: int) -> Counter:
    """Move checked parts into `out`, applying duplicates and the cap; returns the kept
    conversations per user."""
    (out / "conversations").mkdir()
    (out / "rejects").mkdir()
    parts = sorted((work / "kept").glob("part-*.parquet"))
    keys = [_part_keys(part) for part in parts]
    drops = decide_drops(pa.concat_tables(keys), cap) if keys else {}
    per_user: Counter = Counter()
    for part, part_keys in zip(parts, keys):
        task_id = part_keys.column("task_id")[0].as_py() if part_keys.num_rows else -1
        keep = [(task_id, row) not in drops for row in range(part_keys.num_rows)]
        per_user.update(u for u, k in zip(part_keys.column("user_id").to_pylist(), keep) if k)
        if all(keep):  # the common case: both parts move as they are
            part.rename(out / "conversations" / part.name)
            (work / "rejects" / part.name).rename(out / "rejects" / part.name)
        else:
            rejects = pq.read_table(work / "rejects" / part.name)
            table = pq.read_table(part)
            pq.write_table(table.filter(pa.array(keep)), out / "conversations" / part.name)
            dropped = table.filter(pc.invert(pa.array(keep))).to_pylist()
            extra = [reject_row(rec, "filtered", *drops[(task_id, row)], rec["user_id"], rec["conversation_id"])
                     for rec, row in zip(dropped, [r for r, k in enumerate(keep) if not k])]
            rejects = pa.concat_tables([rejects, pa.Table.from_pylist(extra, schema=REJECTS)])
            pq.write_table(rejects, out / "rejects" / part.name)
    return per_user


def summarize(out: Path, per_user: Counter, rows_in: int, redacted: Counter,
              bad_files: list[dict[str, str]]) -> dict[str, Any]:
    """The stage summary; raises if any input row is unaccounted for."""
    rejects = pq.read_table(out / "rejects", schema=REJECTS, columns=["status", "reason"]).to_pylist()
    filtered = Counter(r["reason"] for r in rejects if r["status"] == "filtered")
    rejected = Counter(r["reason"] for r in rejects if r["status"] == "rejected")
    counts = list(per_user.values()) or [0]
    summary = {
        "rows_in": rows_in, "kept": sum(per_user.values()),
        "filtered": dict(sorted(filtered.items())), "rejected": dict(sorted(rejected.items())),
        "users": len(per_user),
        "conversations_per_user": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
        "redacted": dict(sorted(redacted.items())), "bad_files": bad_files,
    }
    accounted = summary["kept"] + sum(filtered.values()) + sum(rejected.values())
    if accounted != rows_in:
        raise RuntimeError(f"ingest lost rows: {rows_in} in, {accounted} accounted for; this is a bug")
    return summary


# --- the stage ----------------------------------------------------------------------------

def run_ingest(config: RunConfig, *, use_ray: bool = True,
               on_plan: Callable[[list[ReadTask]], None] | None = None) -> dict[str, Any]:
    """Run the ingest stage into `<run_dir>/ingest/`; returns its summary."""
    settings = config.ingest
    tasks, files, bad_files = plan(settings)
    if on_plan:
        on_plan(tasks)
    with StageWriter(Path(config.run_dir), STAGE) as stage:
        work = stage.tmp / "_work"
        (work / "kept").mkdir(parents=True)
        (work / "rejects").mkdir()
        if not tasks:
            results = []
        elif use_ray:
            results = check_with_ray(tasks, settings, work, config.resources.progress_bars)
        else:
            results = check_in_process(tasks, settings, work)
        redacted: Counter = Counter()
        for result in results:
            redacted.update(json.loads(result["redacted"]))
        per_user = finalize(work, stage.tmp, settings.filters.max_conversations_per_user)
        shutil.rmtree(work)
        summary = summarize(stage.tmp, per_user, sum(r["rows_in"] for r in results), redacted, bad_files)
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, inputs=fingerprint(files),
                     counts={k: summary[k] for k in ("rows_in", "kept", "filtered", "rejected", "users")})
    summary["output"] = str(stage_dir(config.run_dir, STAGE))
    return summary
