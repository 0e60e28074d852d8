"""Which policy a round uses, which earlier rounds' tables it reads, and what its role actors
ask Ray for.

Round 0 is the first pass: its stages write under the run directory itself. Online round
k (k >= 1) reruns `online.stages` under `<run_dir>/round-<k>/` (pipelines/schema.py
`round_dir`), samples with the newest policy and trains with it as reference. A stage a
round does not rerun is read from round 0 (`upstream_round`): with `online.source:
pipeline` ingest, followups and personas exist once, in the run directory; a served_logs
round has its own (the new log rows, their follow-ups, personas with the new history).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.models import ModelSpec
from pipelines.config import RunConfig
from pipelines.schema import CONVERSATIONS, model_path, table_path


def runs_in_round(config: RunConfig, stage: str, round_index: int) -> bool:
    """Whether round `round_index` runs `stage` (round 0: `stages`; k >= 1: `online.stages`)."""
    return stage in (config.online.stages if round_index else config.stages)


def upstream_round(config: RunConfig, stage: str, round_index: int) -> int:
    """The round whose `stage` tables round `round_index` reads: its own when it reruns that
    stage, else round 0."""
    return round_index if round_index and runs_in_round(config, stage, round_index) else 0


def ingest_rounds(config: RunConfig, up_to: int) -> list[int]:
    """The rounds 0..`up_to` whose ingest holds conversations: round 0, and each served_logs
    round (it ingests the log rows that arrived before it)."""
    return [k for k in range(up_to + 1) if k == 0 or runs_in_round(config, "ingest", k)]


def history(run_dir: Path | str, rounds: list[int]) -> tuple[pa.Table, dict[str, int]]:
    """The ingest conversations of `rounds` (`ingest_rounds`: round 0's, and in a served_logs
    run every later round that ingested), a conversation read by several rounds (it
    continued) once, as the latest round read it; and conversation_id -> that round."""
    tables = {k: pq.read_table(table_path(run_dir, "ingest", "conversations", k), schema=CONVERSATIONS)
              for k in rounds}
    latest = {cid: k for k in rounds for cid in tables[k].column("conversation_id").to_pylist()}
    return latest_reads(tables, latest), latest


def latest_reads(tables: dict[int, pa.Table], latest: dict[str, int]) -> pa.Table:
    """Round -> a table with `conversation_id` (conversations, follow-ups) as one table: each
    round's rows of the conversations it read last (`latest`, from `history`)."""
    return pa.concat_tables([
        table.filter(pa.array([latest[c] == k for c in table.column("conversation_id").to_pylist()], pa.bool_()))
        for k, table in tables.items()])


def new_turns(config: RunConfig, round_index: int, conversation_ids: list[str],
              turn_indexes: list[int]) -> list[bool]:
    """Which (conversation, turn) rows a round may learn from: all of them, except in a
    served_logs round, where a conversation an earlier round read (it continued since) only
    contributes the turns that earlier round did not hold."""
    if not (round_index and runs_in_round(config, "ingest", round_index)):
        return [True] * len(conversation_ids)
    from pipelines.stages.ingest.served import earlier_turns

    held = earlier_turns(config.run_dir, ingest_rounds(config, round_index - 1))
    return [turn >= held.get(cid, 0) for cid, turn in zip(conversation_ids, turn_indexes)]


def policy_spec(config: RunConfig, round_index: int) -> ModelSpec:
    """The policy round `round_index` samples with: models.policy in round 0, else the
    model exported by the newest earlier round's train stage (same decoding settings), or
    models.policy when no earlier round trains (a run whose round 0 only builds data). A
    round whose train stage was skipped (too few pairs, `skipped_train`) exported nothing:
    the round before it counts."""
    trained = [k for k in range(round_index) if runs_in_round(config, "train", k)]
    for k in reversed(trained):
        if skipped_train(config.run_dir, k):
            continue
        folder = model_path(config.run_dir, "train", k)
        if not (folder / "config.json").is_file():
            raise RuntimeError(f"round {round_index} samples with the policy round {k} "
                               f"trained, but {folder} holds no exported model: run its train stage first")
        return trained_policy(config, folder)
    return config.models.policy


def skipped_train(run_dir: Path | str, round_index: int) -> str | None:
    """Why round `round_index`'s train stage finished without training (an online round
    with fewer pairs than one global batch), or None when it trained or has not run."""
    from pipelines.contract import read_manifest

    manifest = read_manifest(run_dir, "train", round_index)
    return (manifest or {}).get("counts", {}).get("skipped")


def trained_policy(config: RunConfig, folder: Path | str) -> ModelSpec:
    """models.policy with its weights replaced by an exported model: same decoding settings
    and engine (a vLLM policy's trained successor runs on vLLM, on a GPU), except that a
    policy served over HTTP (`engine: openai`) becomes `auto`: that server does not hold
    the new weights."""
    spec = config.models.policy
    return spec.model_copy(update={"id": str(Path(folder).resolve()),
                                   "engine": "auto" if spec.engine == "openai" else spec.engine})


def last_train_round(config: RunConfig) -> int:
    """The last round whose train stage the configuration runs, finished and exported a
    policy (online rounds first, then round 0); rounds that skipped training are passed
    over, and so is a train folder an earlier configuration left in a round that no longer
    trains."""
    from pipelines.contract import read_manifest, require_stage

    for k in range(config.online.rounds, -1, -1):
        if (runs_in_round(config, "train", k) and read_manifest(config.run_dir, "train", k) is not None
                and not skipped_train(config.run_dir, k)):
            return k
    require_stage(config.run_dir, "train")   # raises: say what to run
    return 0


def actor_gpus(*specs: ModelSpec | dict | None) -> float:
    """GPUs one role actor asks Ray for: a whole GPU when any of its models runs on one
    (a vLLM engine, or a transformers model with device cuda), else none. Without it Ray
    hides the GPUs from the actor and the engine would fail to start."""
    for spec in specs:
        if spec is None:
            continue
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        if spec.engine == "vllm" or spec.device == "cuda":
            return 1.0
    return 0.0
