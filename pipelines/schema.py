"""Arrow schemas of every table a run writes, and where each lives, declared once.

Each stage writes Parquet under `<run_dir>/<stage>/<table>/` (round k >= 1 of the online
stages under `<run_dir>/round-<k>/<stage>/<table>/`) with exactly these schemas, so any
table can be read back with pandas, DuckDB or `pyarrow.dataset` and checked against them.
Column order is part of the contract. `table_path` and `stage_dir` are the only way code
names a place inside a run directory.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa

from actors.followup_labels import FEEDBACK_LABELS, FOLLOWUP_LABELS  # noqa: F401

TIMESTAMP = pa.timestamp("us", tz="UTC")

# One chat message, as TRL's conversational format expects it.
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

# A conversation turn keeps WildChat's per-turn identifier and time for lineage.
TURN = pa.struct([
    ("role", pa.string()),
    ("content", pa.string()),
    ("timestamp", TIMESTAMP),
    ("turn_identifier", pa.int64()),
])

# Follow-up labels belong to the classifier role (actors/followup_labels.py); re-exported
# here beside the tables that carry them.

# Where each row came from: the input file and the row's index in it (the Parquet row
# number, or the 0-based line number of a JSONL file).
_LINEAGE = [("source_file", pa.string()), ("source_index", pa.int64())]

CONVERSATIONS = pa.schema([
    ("conversation_id", pa.string()),
    ("user_id", pa.string()),
    ("conversation_hash", pa.string()),
    ("timestamp", TIMESTAMP),
    ("model", pa.string()),
    ("language", pa.string()),
    ("system", pa.string()),              # a leading system message (chat JSONL only)
    ("turns", pa.list_(TURN)),
    ("n_user_turns", pa.int32()),
    ("n_chars", pa.int64()),
    ("toxic", pa.bool_()),                # WildChat's flags, kept when the filter is off
    ("wildchat_redacted", pa.bool_()),
    ("redactions", pa.int32()),           # identifiers this project replaced
    ("country", pa.string()),
    ("state", pa.string()),
    ("hashed_ip", pa.string()),
    ("source_format", pa.string()),       # "wildchat" or "jsonl"
    *_LINEAGE,
])

# Every input row that did not become a conversation: filtered (a configured filter said
# no) or rejected (malformed). No text is copied here: lineage points at the source row.
REJECT_STATUSES = ("filtered", "rejected")
REJECTS = pa.schema([
    *_LINEAGE,
    ("conversation_hash", pa.string()),
    ("conversation_id", pa.string()),
    ("user_id", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])

FOLLOWUPS = pa.schema([
    ("followup_id", pa.string()),
    ("conversation_id", pa.string()),
    ("user_id", pa.string()),
    ("turn_index", pa.int32()),           # index in `turns` of the user's follow-up
    ("timestamp", TIMESTAMP),
    ("context", MESSAGES),                # everything before the assistant answer
    ("answer", pa.string()),              # the assistant answer the user reacts to
    ("message", pa.string()),             # the user's follow-up
    ("label", pa.string()),               # null when unclassified
    ("confidence", pa.float32()),
    ("backend", pa.string()),
    ("unclassified_reason", pa.string()),
])

PERSONAS = pa.schema([
    ("persona_id", pa.string()),
    ("user_id", pa.string()),
    ("as_of", TIMESTAMP),                 # one tick after the last turn it was built from
    ("conversations_before", pa.int32()), # built from the user's first this-many conversations
    ("persona", pa.string()),             # "" for a user with no earlier history
    ("history_conversations", pa.int32()),
    ("history_tokens", pa.int32()),
    ("redactions", pa.int32()),
    ("backend", pa.string()),
    ("serving", pa.bool_()),              # the per-user persona built from all history
])

# The persona every conversation's turns see: the latest snapshot built only from the user's
# conversations before it (in the user's order), never from itself or later ones.
CONVERSATION_PERSONAS = pa.schema([
    ("conversation_id", pa.string()),
    ("user_id", pa.string()),
    ("persona_id", pa.string()),
    ("conversation_index", pa.int32()),   # its place in the user's conversations, 0-based
])

# The train/evaluation split is by user, so no user's turns are on both sides.
USERS = pa.schema([
    ("user_id", pa.string()),
    ("split", pa.string()),               # "train" or "eval"
    ("conversations", pa.int32()),
    ("has_history", pa.bool_()),          # two or more conversations
])

# One row per feedback follow-up the rewrites stage saw: kept pairs and every filtered one
# with its reason (DESIGN.md source 1). `prompt` is the DPO prompt (base system prompt +
# persona block + context); it ends at the user turn the answer responds to.
REWRITE_STATUSES = ("kept", "filtered")
REWRITES = pa.schema([
    ("followup_id", pa.string()),
    ("conversation_id", pa.string()),
    ("user_id", pa.string()),
    ("persona_id", pa.string()),          # null: no snapshot before the turn, or user-agnostic
    ("turn_index", pa.int32()),
    ("prompt", MESSAGES),
    ("chosen", pa.string()),              # the rewrite
    ("rejected", pa.string()),            # the regenerated (or original) answer
    ("rejected_source", pa.string()),     # "regenerated" or "original"
    ("label", pa.string()),               # the follow-up's label
    ("margin", pa.float32()),             # scorer's P(rewrite better) - 0.5; null if not scored
    ("status", pa.string()),
    ("reason", pa.string()),              # why filtered; null when kept
    ("round", pa.int32()),
])

SAMPLES = pa.schema([
    ("sample_id", pa.string()),
    ("user_id", pa.string()),
    ("persona_id", pa.string()),
    ("conversation_id", pa.string()),
    ("turn_index", pa.int32()),
    ("prompt", MESSAGES),
    ("candidates", pa.list_(pa.string())),
    ("truncated", pa.list_(pa.bool_())),  # per candidate: cut at the policy's max_new_tokens
    ("scores", pa.list_(pa.float32())),
    ("reward_backend", pa.string()),
    ("round", pa.int32()),
    ("status", pa.string()),              # "kept" (became a pair) or "filtered"
    ("reason", pa.string()),              # why no pair: e.g. below_threshold, tied_scores
    ("margin", pa.float32()),             # best - worst score; null with fewer than 2
    ("chosen_index", pa.int32()),         # the pair's candidates when kept (best, worst); else null
    ("rejected_index", pa.int32()),
])

PAIR_SOURCES = ("rewrite", "reward")
SPLITS = ("train", "eval")
# TRL's conversational preference format plus lineage.
PAIRS = pa.schema([
    ("pair_id", pa.string()),
    ("prompt", MESSAGES),                 # base system prompt + persona block + context
    ("chosen", MESSAGES),
    ("rejected", MESSAGES),
    ("user_id", pa.string()),
    ("split", pa.string()),
    ("source", pa.string()),
    ("margin", pa.float32()),
    ("persona_id", pa.string()),
    ("conversation_id", pa.string()),
    ("followup_id", pa.string()),         # rewrite pairs
    ("sample_id", pa.string()),           # reward pairs
    ("round", pa.int32()),
])

TABLES: dict[str, pa.Schema] = {
    "conversations": CONVERSATIONS,
    "rejects": REJECTS,
    "followups": FOLLOWUPS,
    "personas": PERSONAS,
    "users": USERS,
    "conversation_personas": CONVERSATION_PERSONAS,
    "rewrites": REWRITES,
    "samples": SAMPLES,
    "pairs": PAIRS,
}


MODEL_FOLDER = "model"
# The stage that writes each table.
TABLE_STAGE = {"conversations": "ingest", "rejects": "ingest", "followups": "followups",
               "personas": "personas", "users": "personas", "conversation_personas": "personas",
               "rewrites": "rewrites",
               "samples": "rewards", "pairs": "pairs"}


def round_dir(run_dir: Path | str, round_index: int = 0) -> Path:
    """The folder round `round_index`'s stages write into: the run directory for round 0,
    `<run_dir>/round-<k>/` for online round k."""
    run_dir = Path(run_dir)
    return run_dir if round_index == 0 else run_dir / f"round-{round_index}"


def run_rounds(run_dir: Path | str) -> list[int]:
    """The rounds a run directory holds: 0, then every online round with a folder."""
    later = [int(p.name[6:]) for p in Path(run_dir).glob("round-*") if p.name[6:].isdigit()]
    return [0, *sorted(later)]


PLAN_FILE = "plan.json"   # the driver's latest plan: {"online_rounds": R, "steps": [...]}


def planned_rounds(run_dir: Path | str) -> list[int]:
    """The rounds of `run_rounds` that the latest `rlhi run` planned: a round folder an
    earlier configuration with more online rounds left behind is not part of this run
    (the report and the serving personas pass it over; `rlhi forget` still cleans it).
    Every round with a folder when no run wrote a plan."""
    plan = Path(run_dir) / PLAN_FILE
    rounds = run_rounds(run_dir)
    if not plan.is_file():
        return rounds
    last = json.loads(plan.read_text())["online_rounds"]
    return [k for k in rounds if k <= last]


def step_name(round_index: int, stage: str) -> str:
    """What the plan, --from/--only, manifests' upstream and the report call a step of round
    `round_index` (its folder relative to the run directory): `rewards`, `round-1/rewards`."""
    return stage if round_index == 0 else f"round-{round_index}/{stage}"


def stage_dir(run_dir: Path | str, stage: str, round_index: int = 0) -> Path:
    """A finished stage's folder (its tables, summary.json, manifest.json, models)."""
    return round_dir(run_dir, round_index) / stage


def model_path(run_dir: Path | str, stage: str, round_index: int = 0) -> Path:
    """Where a model-training stage (train, reward_model) exports its model: a folder that
    `from_pretrained` loads (safetensors, config, tokenizer)."""
    return stage_dir(run_dir, stage, round_index) / MODEL_FOLDER


def table_path(run_dir: Path | str, stage: str, table: str, round_index: int = 0) -> Path:
    """The folder of one table (Parquet parts) of a stage in a round."""
    if TABLE_STAGE.get(table) != stage:
        raise ValueError(f"table {table!r} is not written by stage {stage!r}; the tables are "
                         + ", ".join(f"{t} ({s})" for t, s in TABLE_STAGE.items()))
    return stage_dir(run_dir, stage, round_index) / table


def pseudonym(user_key: str) -> str:
    """The user id tables keep for a user key: a hash already (WildChat's 64-hex
    `hashed_ip`, or a 40-hex combined key) as it is; anything else (an e-mail or a name in
    a chat log's `user_id`, a served request's `user`) replaced by its SHA-256, so that no
    table, persona or log carries it. The same key always gives the same id."""
    if len(user_key) in (40, 64) and all(c in "0123456789abcdef" for c in user_key):
        return user_key
    return hashlib.sha256(user_key.encode("utf-8")).hexdigest()


def conversation_id(user_id: str, conversation_hash: str, first_turn_key: str) -> str:
    """A stable, unique id for one conversation of one user.

    WildChat's `conversation_hash` is a hash of the text alone, so identical conversations
    from different users (or the same user twice) share it. Adding the user key and the
    first turn's identifier (or timestamp) tells them apart and stays stable across reruns.
    """
    key = "\x1f".join((user_id, conversation_hash, first_turn_key))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def check_schema(table: pa.Table, schema: pa.Schema, name: str) -> None:
    """Raise if a table does not have exactly the declared schema (names, types, order)."""
    if not table.schema.equals(schema):
        raise ValueError(f"table {name!r} does not match pipelines/schema.py:\n"
                         f"got:      {table.schema}\nexpected: {schema}")
