"""Stage `followups`: `conversations` -> `followups`, one labelled row per user follow-up.

A follow-up is a user turn that comes right after an assistant turn. Its row carries the
context before the assistant answer, the answer it reacts to, the user's message, and the
FollowupClassifier's label, confidence and backend (actors/followup_classifier.py). The
labels reattempt_feedback, correction and complaint carry feedback and feed rewrites.

Top to bottom: extract the follow-ups (a plain function on Arrow), classify them in a Ray
Data actor pool (the role built once per actor), write them with Ray Data's Parquet writer.
Every follow-up gets a row; one the classifier cannot use is kept with label null and
`unclassified_reason`, never guessed.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import RunConfig
from pipelines.schema import CONVERSATIONS, FOLLOWUPS, stage_dir, table_path
from pipelines.contract import StageWriter, require_stage

STAGE = "followups"
UNLABELLED = [name for name in FOLLOWUPS.names if name not in ("label", "confidence", "backend", "unclassified_reason")]


def followup_id(conversation_id: str, turn_index: int) -> str:
    return hashlib.sha256(f"{conversation_id}\x1f{turn_index}".encode()).hexdigest()[:20]


def extract_followups(conversations: pa.Table) -> pa.Table:
    """One row per user turn after an assistant turn (labels not yet set)."""
    rows = []
    columns = conversations.select(["conversation_id", "user_id", "timestamp", "system", "turns"]).to_pylist()
    for conv in columns:
        turns = conv["turns"]
        prefix = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
        for index in range(1, len(turns)):
            if turns[index]["role"] != "user" or turns[index - 1]["role"] != "assistant":
                continue
            context = prefix + [{"role": t["role"], "content": t["content"]} for t in turns[: index - 1]]
            rows.append({
                "followup_id": followup_id(conv["conversation_id"], index),
                "conversation_id": conv["conversation_id"], "user_id": conv["user_id"],
                "turn_index": index, "timestamp": turns[index]["timestamp"] or conv["timestamp"],
                "context": context, "answer": turns[index - 1]["content"], "message": turns[index]["content"],
            })
    schema = pa.schema([FOLLOWUPS.field(name) for name in UNLABELLED])
    return pa.Table.from_pylist(rows, schema=schema)


def label(classifier, conversations: pa.Table, batch_size: int) -> pa.Table:
    """Extract the follow-ups of some conversations and label them, `batch_size` at a time."""
    followups = extract_followups(conversations)
    parts = [classifier(followups.slice(start, batch_size)).select(FOLLOWUPS.names).cast(FOLLOWUPS)
             for start in range(0, followups.num_rows, batch_size)]
    return pa.concat_tables(parts) if parts else FOLLOWUPS.empty_table()


class LabelWorker:
    """Ray Data callable class around the FollowupClassifier role: reads a conversations part,
    extracts and labels its follow-ups, writes them as a part of its own (no read or write
    task competes with the pool for CPUs, and no row data passes through the driver), and
    returns only counts."""

    def __init__(self, backend: str, model: dict[str, Any], batch_size: int, out: str,
                 cascade_model: str = "llm", learned_model: str | None = None) -> None:
        from actors.followup_classifier import FollowupClassifier

        self.classifier = FollowupClassifier(backend=backend, model=model, cascade_model=cascade_model,
                                             learned_model=learned_model)
        self.batch_size = batch_size
        self.out = Path(out)

    def __call__(self, batch: pa.Table) -> pa.Table:
        counts = []
        for path in batch.column("path").to_pylist():
            labelled = label(self.classifier, pq.read_table(path, schema=CONVERSATIONS), self.batch_size)
            pq.write_table(labelled, self.out / Path(path).name)
            counts.append({"part": Path(path).name, "rows": labelled.num_rows,
                           "labels": json.dumps(Counter(labelled.column("label").to_pylist()))})
        return pa.Table.from_pylist(counts)


def label_with_ray(parts: list[Path], config: RunConfig, out: Path) -> tuple[int, Counter]:
    """Label every conversation part in an actor pool, one output part per input part;
    returns the rows written and the label counts (None: unclassified)."""
    import ray

    settings = config.followups
    workers = settings.workers or max(1, int(ray.available_resources().get("CPU", 1)))
    gpus = classifier_gpus(config)
    results = ray.data.from_items([{"path": str(p)} for p in parts], override_num_blocks=len(parts)).map_batches(
        LabelWorker, fn_constructor_kwargs={"backend": settings.backend, "batch_size": settings.batch_size,
                                            "model": config.models.classifier.model_dump(), "out": str(out),
                                            "cascade_model": settings.cascade_model,
                                            "learned_model": settings.learned_model},
        batch_size=1, batch_format="pyarrow", num_cpus=1, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(parts))))
    rows, labels = 0, Counter()
    for batch in results.iter_batches(batch_format="pyarrow", batch_size=None):
        for result in batch.to_pylist():
            rows += result["rows"]
            labels.update({None if k == "null" else k: v for k, v in json.loads(result["labels"]).items()})
    return rows, labels


def classifier_gpus(config: RunConfig) -> float:
    """GPUs one labelling actor asks for: one when the backend runs models.classifier on a
    GPU (`llm`, or `cascade` with the LLM behind the rules), else none."""
    from pipelines.rounds import actor_gpus

    return actor_gpus(*[model for model in classifier_models(config) if model.get("kind") != "learned-followups"])


def classifier_models(config: RunConfig) -> list[dict[str, Any]]:
    """The models the configured backend runs, for the manifest: the LLM classifier, or the
    learned artifact with the hash of its training data."""
    settings = config.followups
    if settings.backend == "rules":
        return []
    if settings.backend == "learned" or (settings.backend == "cascade" and settings.cascade_model == "learned"):
        from actors.followup_learned import ARTIFACT

        folder = Path(settings.learned_model) if settings.learned_model else ARTIFACT
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        return [{"id": str(folder), "kind": "learned-followups",
                 "training_data_sha256": meta.get("training_data_sha256")}]
    return [config.models.classifier.model_dump()]


def run_followups(config: RunConfig, round_index: int = 0) -> dict[str, Any]:
    """Run the stage into `<run_dir>/followups/` (a served_logs round: its own folder, over
    its new conversations); returns its summary."""
    from pipelines.rounds import upstream_round

    run_dir, source = Path(config.run_dir), upstream_round(config, "ingest", round_index)
    upstream = require_stage(run_dir, "ingest", source)
    parts = sorted(table_path(run_dir, "ingest", "conversations", source).glob("*.parquet"))
    with StageWriter(run_dir, STAGE, round_index) as stage:
        table_dir = stage.table_dir("followups")
        if parts:
            written, labels = label_with_ray(parts, config, table_dir)
        else:
            written, labels = 0, Counter()
        if not any(table_dir.iterdir()):
            pq.write_table(FOLLOWUPS.empty_table(), table_dir / "part-000000.parquet")
        on_disk = sum(pq.ParquetFile(f).metadata.num_rows for f in table_dir.glob("*.parquet"))
        if on_disk != written:
            raise RuntimeError(f"followups lost rows: {written} labelled, {on_disk} on disk")
        summary = {
            "conversations": upstream["counts"]["kept"], "followups": written,
            "labels": {str(k): v for k, v in sorted(labels.items(), key=lambda kv: str(kv[0])) if k is not None},
            "unclassified": labels.get(None, 0), "backend": config.followups.backend,
        }
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, upstream={"ingest": upstream},
                     models=classifier_models(config), counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE, round_index))
    return summary
