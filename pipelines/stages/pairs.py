"""Stage `pairs`: both pair sources as train / eval preference sets in TRL's format.

Reads a round's kept rewrites (source `rewrite`: the rewrite is chosen, the regenerated or
original answer rejected) and kept samples (source `reward`: best versus worst candidate,
the candidates the rewards stage recorded), only the sources in `train.sources`. The prompt is used
as the upstream stage stored it: base system prompt + persona block + context, ending with
the user turn answered. Rows are split by user (`user_splits`), so no user is on both sides.

Every row is checked before it is written (`check_pair`): the prompt ends with a user
message, chosen and rejected differ, and a rewrite pair's prompt does not contain the
follow-up that gave the feedback (the policy would otherwise learn from the answer key).
A violation stops the stage naming the pair. The stage never reads `data/eval/`.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import RunConfig
from pipelines.contract import StageWriter, require_stage
from pipelines.persona_join import user_splits
from pipelines.rounds import runs_in_round, upstream_round
from pipelines.schema import PAIRS, REWRITES, SAMPLES, check_schema, stage_dir, table_path

STAGE = "pairs"
EVAL_DATA = Path(__file__).resolve().parents[2] / "data" / "eval"  # held-out benchmarks


class PairError(ValueError):
    """A pair that must not be trained on; the message names it and says what is wrong."""


def pair_id(source: str, upstream_id: str, round_index: int) -> str:
    """Stable id: the same upstream row in the same round, the same pair."""
    return hashlib.sha256(f"{source}\x1f{upstream_id}\x1f{round_index}".encode()).hexdigest()[:20]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --- the two sources ----------------------------------------------------------------------

def rewrite_pairs(rewrites: pa.Table) -> list[dict[str, Any]]:
    """Pair rows (without split) from the rewrites stage's kept rows."""
    rows = []
    for r in rewrites.to_pylist():
        if r["status"] != "kept":
            continue
        rows.append({
            "pair_id": pair_id("rewrite", r["followup_id"], r["round"]), "prompt": r["prompt"],
            "chosen": answer(r["chosen"]), "rejected": answer(r["rejected"]), "user_id": r["user_id"],
            "source": "rewrite", "margin": r["margin"], "persona_id": r["persona_id"],
            "conversation_id": r["conversation_id"], "followup_id": r["followup_id"], "sample_id": None,
            "round": r["round"], "label": r["label"],
        })
    return rows


def reward_pairs(samples: pa.Table) -> list[dict[str, Any]]:
    """Pair rows (without split) from the rewards stage's kept rows: best vs worst."""
    rows = []
    for s in samples.to_pylist():
        if s["status"] != "kept":
            continue
        chosen, rejected = s["chosen_index"], s["rejected_index"]
        if chosen is None or rejected is None or not (0 <= chosen < len(s["candidates"])
                                                      and 0 <= rejected < len(s["candidates"])):
            raise PairError(f"sample {s['sample_id']} is kept but names no valid pair of candidates "
                            f"(chosen_index {chosen}, rejected_index {rejected}): rerun the rewards stage")
        rows.append({
            "pair_id": pair_id("reward", s["sample_id"], s["round"]), "prompt": s["prompt"],
            "chosen": answer(s["candidates"][chosen]),
            "rejected": answer(s["candidates"][rejected]), "user_id": s["user_id"],
            "source": "reward", "margin": s["margin"], "persona_id": s["persona_id"],
            "conversation_id": s["conversation_id"], "followup_id": None, "sample_id": s["sample_id"],
            "round": s["round"], "label": None,
        })
    return rows


# --- checks -------------------------------------------------------------------------------

def check_pair(row: dict[str, Any], followup: dict[str, Any] | None = None) -> None:
    """Raise PairError naming the pair if it must not be trained on.

    `followup` (rewrite pairs): the FOLLOWUPS row, with `message` (the feedback) and
    `context` (the conversation before the rejected answer). The follow-up may occur in the
    prompt only as often as it occurs in that context (a user can repeat themselves), never
    more: more means the prompt reaches past the answer the feedback is about.
    """
    name = f"pair {row['pair_id']} ({row['source']}, conversation {row['conversation_id']})"
    prompt = row["prompt"] or []
    if not prompt or prompt[-1]["role"] != "user":
        last = prompt[-1]["role"] if prompt else "nothing"
        raise PairError(f"{name}: the prompt must end with a user message, it ends with {last}")
    if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
        raise PairError(f"{name}: chosen and rejected are the same text")
    if row["source"] != "rewrite":
        return
    if followup is None:
        raise PairError(f"{name}: follow-up {row['followup_id']} is not in the followups table")
    feedback = followup["message"].strip()
    allowed = sum(m["content"].strip() == feedback for m in followup["context"] or [])
    if feedback and sum(m["content"].strip() == feedback for m in prompt) > allowed:
        raise PairError(f"{name}: the prompt contains the user's follow-up {feedback[:60]!r}, which "
                        "comes after the rejected answer")


def check_not_eval_data(paths: Sequence[Path], eval_data: Path = EVAL_DATA) -> None:
    """No stage reads the held-out evaluation data: raise if an input lies under it."""
    for path in paths:
        if Path(path).resolve().is_relative_to(eval_data.resolve()):
            raise RuntimeError(f"the pairs stage must not read {eval_data} (held-out evaluation "
                               f"data), but its input {path} is there: point run_dir elsewhere")


def with_splits(rows: list[dict[str, Any]], splits: dict[str, str]) -> list[dict[str, Any]]:
    for row in rows:
        if row["user_id"] not in splits:
            raise PairError(f"pair {row['pair_id']}: user {row['user_id']} is not in the personas "
                            "stage's users table: rerun personas on the same ingest")
        row["split"] = splits[row["user_id"]]
    return rows


# --- the stage ----------------------------------------------------------------------------

def run_pairs(config: RunConfig, round_index: int = 0) -> dict[str, Any]:
    """Run the stage into `<round_dir>/pairs/` (table `pairs`); returns its summary."""
    run_dir, sources = Path(config.run_dir), config.train.sources
    source = {name: upstream_round(config, name, round_index) for name in ("followups", "personas")}
    upstream = {name: require_stage(run_dir, name, k) for name, k in source.items()}
    inputs = [table_path(run_dir, "followups", "followups", source["followups"]),
              table_path(run_dir, "personas", "users", source["personas"])]
    rows, rewrites_status = [], "not a train source"
    if "rewrite" in sources:
        # Only a configured rewrites stage is read: a folder an earlier configuration left
        # (an ablation that dropped the stage) holds pairs this run did not make.
        if not runs_in_round(config, "rewrites", round_index):
            rewrites_status = "absent: the rewrites stage is not configured, so no rewrite pairs"
        else:
            upstream["rewrites"] = require_stage(run_dir, "rewrites", round_index)  # configured but not run: say so
            inputs.append(table_path(run_dir, "rewrites", "rewrites", round_index))
            rewrites_status = "read"
    if "reward" in sources:
        upstream["rewards"] = require_stage(run_dir, "rewards", round_index)
        inputs.append(table_path(run_dir, "rewards", "samples", round_index))
    check_not_eval_data(inputs)

    if "rewrites" in upstream:
        rows += rewrite_pairs(pq.read_table(table_path(run_dir, "rewrites", "rewrites", round_index), schema=REWRITES))
    if "rewards" in upstream:
        rows += reward_pairs(pq.read_table(table_path(run_dir, "rewards", "samples", round_index), schema=SAMPLES))
    followups = {f["followup_id"]: f for f in
                 pq.read_table(inputs[0], columns=["followup_id", "message", "context"]).to_pylist()}
    for row in rows:
        check_pair(row, followups.get(row["followup_id"]) if row["source"] == "rewrite" else None)
    rows = sorted(with_splits(rows, user_splits(run_dir, source["personas"])),
                  key=lambda r: (r["split"], r["source"], r["pair_id"]))

    with StageWriter(run_dir, STAGE, round_index) as stage:
        pairs = pa.Table.from_pylist(rows, schema=PAIRS)
        check_schema(pairs, PAIRS, "pairs")
        pq.write_table(pairs, stage.table_dir("pairs") / "part-0.parquet")
        summary = {
            "pairs": len(rows), "sources": list(sources), "rewrites": rewrites_status,
            "by_source": {source: {split: sum(1 for r in rows if r["source"] == source and r["split"] == split)
                                   for split in ("train", "eval")} for source in ("rewrite", "reward")},
            "users": {split: len({r["user_id"] for r in rows if r["split"] == split}) for split in ("train", "eval")},
            "rewrite_labels": dict(sorted(Counter(r["label"] for r in rows if r["source"] == "rewrite").items())),
            "round": round_index,
        }
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, upstream=upstream, counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE, round_index))
    return summary
