"""Stage `ingest`: WildChat Parquet or chat JSONL -> `conversations` and `rejects`.

Top to bottom:
1. plan: check every input file on the driver and split it into read tasks
   (pipelines/stages/ingest/sources.py); a file that cannot be read fails here, naming it;
2. check: a Ray Data actor pool streams the tasks; per row, structure rules, filters and
   redaction (pipelines/stages/ingest/checks.py); each task writes its kept rows and rejects as Parquet
   parts, so row data never passes through the driver;
3. decide: from the kept rows' keys alone, bucket by bucket in parallel tasks
   (pipelines/stages/ingest/drops.py), duplicates (same conversation_id, the first in input
   order kept) and the per-user cap; no process, the driver included, holds every row's keys;
4. finalize, one task a part: parts with no row to drop are moved as they are, the others
   rewritten; the stage folder is published atomically (pipelines/contract.py).

Every input row ends in exactly one place: `conversations`, or `rejects` with status
"filtered" (a configured filter) or "rejected" (malformed) and a reason; the summary
checks in = kept + filtered + rejected.

The run directory must be visible to every worker (local disk on one machine, a shared
file system on a cluster), since workers write their parts into it.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.stages.ingest import drops, served
from pipelines.stages.ingest.checks import check_records, reject_row
from pipelines.config import IngestConfig, RunConfig
from pipelines.schema import REJECTS, round_dir, stage_dir
from pipelines.stages.ingest.sources import InputError, ReadTask, detect_format, plan_file, read_task_records, resolve_inputs
from pipelines.contract import StageWriter, fingerprint
from pipelines.runtime import map_tasks

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


# --- 3. decide and 4. finalize --------------------------------------------------------------

def finalize(work: Path, out: Path, cap: int, rows: int, use_ray: bool) -> Counter:
    """Move checked parts into `out`, dropping duplicates and rows over the per-user cap
    (pipelines/stages/ingest/drops.py: decided bucket by bucket, no process holds every
    row's keys); each step runs over the parts or buckets as Ray tasks when `use_ray`.
    Returns the histogram kept conversations -> users."""
    (out / "conversations").mkdir()
    (out / "rejects").mkdir()
    keys_dir, drops_dir = work / "keys", work / "drops"
    drops_dir.mkdir()
    parts = sorted((work / "kept").glob("part-*.parquet"))
    buckets = drops.bucket_count(rows)
    run = functools.partial(map_tasks, use_ray=use_ray)
    run(drops.shard_keys, [(str(p), _task_id(p), str(keys_dir), buckets) for p in parts])
    run(drops.find_duplicates, [(str(b), str(keys_dir), str(drops_dir), buckets)
                                for b in sorted(keys_dir.glob("cid-*"))])
    histograms = run(drops.apply_cap, [(str(b), str(drops_dir), cap) for b in sorted(keys_dir.glob("user-*"))])
    run(finish_part, [(str(p), str(drops_dir), str(out)) for p in parts])
    return drops.merge_histograms(histograms)


def finish_part(part: str, drops_dir: str, out: str) -> None:
    """Move one checked part (and its rejects) into `out`, rewritten when it has drops: the
    dropped rows join the part's rejects, filtered with their reason."""
    part_path, out_dir = Path(part), Path(out)
    rejects_path = part_path.parent.parent / "rejects" / part_path.name
    dropped = drops.read_drops(Path(drops_dir), _task_id(part_path))
    if not dropped.num_rows:  # the common case: both parts move as they are
        _move(rejects_path, out_dir / "rejects" / part_path.name)
        _move(part_path, out_dir / "conversations" / part_path.name)
        return
    table = pq.read_table(part_path)
    rows = pc.subtract(dropped.column("order"), drops.task_range(_task_id(part_path))[0])
    drop_mask = pc.is_in(pa.array(range(table.num_rows), pa.int64()), rows.combine_chunks())
    pq.write_table(table.filter(pc.invert(drop_mask)), out_dir / "conversations" / part_path.name)
    reasons = {row: (reason, detail) for row, reason, detail in
               zip(rows.to_pylist(), dropped.column("reason").to_pylist(), dropped.column("detail").to_pylist())}
    extra = [reject_row(rec, "filtered", *reasons[row], rec["user_id"], rec["conversation_id"])
             for row, rec in zip(np.flatnonzero(drop_mask.to_numpy(zero_copy_only=False)).tolist(),
                                 table.filter(drop_mask).to_pylist())]
    rejects = pa.concat_tables([pq.read_table(rejects_path), pa.Table.from_pylist(extra, schema=REJECTS)])
    pq.write_table(rejects, out_dir / "rejects" / part_path.name)


def _move(source: Path, target: Path) -> None:
    """Rename `source` to `target`; done already (a task Ray retried after its worker died
    mid-way) when only the target is there."""
    if source.exists() or not target.exists():
        source.rename(target)


def _task_id(part: Path) -> int:
    return int(Path(part).stem.split("-")[1])


def summarize(out: Path, per_user: Counter, rows_in: int, redacted: Counter,
              bad_files: list[dict[str, str]]) -> dict[str, Any]:
    """The stage summary; raises if any input row is unaccounted for. `per_user` is the
    histogram kept conversations -> users; rejects are counted part by part."""
    filtered, rejected = Counter(), Counter()
    for part in sorted((out / "rejects").glob("*.parquet")):
        counts = pq.read_table(part, columns=["status", "reason"]).group_by(["status", "reason"]).aggregate(
            [([], "count_all")])
        for status, reason, count in zip(*(counts.column(c).to_pylist() for c in ("status", "reason", "count_all"))):
            (filtered if status == "filtered" else rejected)[reason] += count
    users = sum(per_user.values())
    summary = {
        "rows_in": rows_in, "kept": sum(count * n for count, n in per_user.items()),
        "filtered": dict(sorted(filtered.items())), "rejected": dict(sorted(rejected.items())),
        "users": users,
        "conversations_per_user": {"min": min(per_user) if users else 0,
                                   "median": drops.histogram_median(per_user) if users else 0,
                                   "max": max(per_user) if users else 0},
        "redacted": dict(sorted(redacted.items())), "bad_files": bad_files,
    }
    accounted = summary["kept"] + sum(filtered.values()) + sum(rejected.values())
    if accounted != rows_in:
        raise RuntimeError(f"ingest lost rows: {rows_in} in, {accounted} accounted for; this is a bug")
    return summary


# --- the stage ----------------------------------------------------------------------------

def run_ingest(config: RunConfig, round_index: int = 0, *, use_ray: bool = True,
               on_plan: Callable[[list[ReadTask]], None] | None = None) -> dict[str, Any]:
    """Run the ingest stage into `<run_dir>/ingest/` (round 0: `ingest.inputs`), or into
    `<run_dir>/round-<k>/ingest/` for a served_logs round (the chat log's rows that arrived
    since the round before, pipelines/stages/ingest/served.py); returns its summary."""
    settings, ledger = config.ingest, None
    if round_index:
        ledger = served.round_input(served_logs_folder(config), config.run_dir, round_index)
        snapshot = round_dir(config.run_dir, round_index) / served.SNAPSHOT
        settings = settings.model_copy(update={"inputs": [str(snapshot)], "format": "wildchat"})
    tasks, files, bad_files = plan(settings)
    if on_plan:
        on_plan(tasks)
    with StageWriter(Path(config.run_dir), STAGE, round_index) as stage:
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
        rows_in = sum(r["rows_in"] for r in results)
        per_user = finalize(work, stage.tmp, settings.filters.max_conversations_per_user, rows_in, use_ray)
        shutil.rmtree(work)
        summary = summarize(stage.tmp, per_user, rows_in, redacted, bad_files)
        if ledger is not None:
            (stage.tmp / served.LEDGER).write_text(json.dumps(ledger, indent=2))
            summary["served"] = {"parts": len(ledger["parts"]), "rows": ledger["rows"]}
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, inputs=fingerprint(files),
                     counts={k: summary[k] for k in ("rows_in", "kept", "filtered", "rejected", "users")
                             + (("served",) if ledger is not None else ())})
    summary["output"] = str(stage_dir(config.run_dir, STAGE, round_index))
    return summary


def served_logs_folder(config: RunConfig) -> Path:
    """The chat log a served_logs round reads: `online.logs`, else `serve.chat.log.folder`."""
    return Path(config.online.logs or config.serve.chat.log.folder)
