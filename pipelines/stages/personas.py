"""Stage `personas`: snapshots of each user's persona, built only from earlier history.

For each user (Ray Data `groupby("user_id")`), conversations are put in order (by timestamp,
then id). Snapshot k follows every `cadence`-th conversation and is built only from the
user's first k conversations: the most recent first, within a history budget, toxic ones
left out. Every user also gets an explicit empty snapshot (k = 0, counted) and one serving
persona built from all history. `as_of` records one tick after the latest turn a snapshot
read.

Which snapshot a turn sees is decided by conversation order, not by clocks (logs disagree on
whether a conversation's timestamp is its first or its last turn): table
`conversation_personas` gives every conversation the latest snapshot built only from
conversations before it, so a persona never contains the turn it conditions, the rest of its
conversation, or anything later (pipelines/persona_join.py).

Users are split into train and evaluation users by a hash of their key, with a guaranteed
minimum of evaluation users who have history (`split_users`).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import PersonasConfig, RunConfig
from pipelines.persona_join import user_splits
from pipelines.schema import (CONVERSATION_PERSONAS, FEEDBACK_LABELS, FOLLOWUPS, PERSONAS, USERS, check_schema,
                              stage_dir, step_name, table_path)
from pipelines.contract import StageWriter, require_stage

STAGE = "personas"
BEGINNING = datetime(1970, 1, 1, tzinfo=timezone.utc)
ONE_TICK = timedelta(microseconds=1)


def approx_tokens(text: str) -> int:
    """About four characters a token: good enough to bound a history, model-free."""
    return len(text) // 4 + 1


def persona_id(user_id: str, as_of: datetime, persona: str, serving: bool) -> str:
    key = f"{user_id}\x1f{as_of.isoformat()}\x1f{serving}\x1f{persona}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def history_item(conversation: dict[str, Any], feedback: Sequence[str]) -> dict[str, Any]:
    return {"conversation_id": conversation["conversation_id"], "language": conversation["language"],
            "turns": [{"role": t["role"], "content": t["content"]} for t in conversation["turns"]],
            "feedback": list(feedback)}


def select_history(earlier: Sequence[dict[str, Any]], max_conversations: int, max_tokens: int) -> list[dict[str, Any]]:
    """The most recent non-toxic conversations first, within the budget."""
    chosen, used = [], 0
    for conversation in reversed(earlier):
        if conversation.get("toxic"):
            continue
        cost = sum(approx_tokens(t["content"]) for t in conversation["turns"] if t["role"] == "user")
        if chosen and (len(chosen) >= max_conversations or used + cost > max_tokens):
            break
        chosen.append(conversation)
        used += cost
    return chosen


def user_snapshots(conversations: Sequence[dict[str, Any]], feedback: dict[str, list[str]], *,
                   cadence: int, max_conversations: int, max_tokens: int, backend: str,
                   build: Callable[[list[list[dict[str, Any]]]], list[str]],
                   redact: Callable[[list[str]], list[tuple[str, dict[str, int]]]]) -> list[dict[str, Any]]:
    """All persona rows of one user: the empty one, one per `cadence` conversations, the
    serving one. `conversations` are that user's rows of the `conversations` table."""
    ordered = conversation_order(conversations)
    user = ordered[0]["user_id"]
    counts = [0] + [i + 1 for i in range(len(ordered)) if (i + 1) % cadence == 0]
    points: list[tuple[datetime, int, bool]] = [(_after(ordered[:k]), k, False) for k in counts]
    points.append((_after(ordered), len(ordered), True))
    histories = []
    for _, count, _ in points:
        chosen = select_history(ordered[:count], max_conversations, max_tokens)
        histories.append([history_item(c, feedback.get(c["conversation_id"], [])) for c in chosen])
    rows, built = [], iter(redact(build([h for h in histories if h])))   # every persona redacted at once
    for (as_of, count, serving), history in zip(points, histories):
        text, found = next(built) if history else ("", {})
        rows.append({
            "persona_id": persona_id(user, as_of, text, serving), "user_id": user, "as_of": as_of,
            "conversations_before": count,
            "persona": text, "history_conversations": len(history),
            "history_tokens": sum(approx_tokens(t["content"]) for h in history for t in h["turns"] if t["role"] == "user"),
            "redactions": sum(found.values()), "backend": backend, "serving": serving,
        })
    return rows


def conversation_start(conversation: dict[str, Any]) -> datetime:
    """When a conversation began: its first turn's timestamp where turns carry one (logs
    disagree on whether a conversation's own timestamp is its first turn or its last: the
    chat app's log stamps the last), else the conversation's timestamp."""
    times = [t["timestamp"] for t in conversation["turns"] if t.get("timestamp")]
    return min(times) if times else conversation["timestamp"]


def conversation_order(conversations: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One user's conversations in the order snapshots follow them: by when they began, then id."""
    return sorted(conversations, key=lambda c: (conversation_start(c), c["conversation_id"]))


def _after(conversations: Sequence[dict[str, Any]]) -> datetime:
    """One tick after the latest turn (or conversation timestamp) of `conversations`."""
    times = [t.get("timestamp") or c["timestamp"] for c in conversations for t in c["turns"]]
    times += [c["timestamp"] for c in conversations]
    return max(times) + ONE_TICK if times else BEGINNING


def conversation_snapshots(conversations: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                           cadence: int) -> list[dict[str, Any]]:
    """CONVERSATION_PERSONAS rows of one user: conversation i sees snapshot k, the largest
    multiple of `cadence` <= i, built from conversations 0..k-1 (`rows` in the order
    `user_snapshots` wrote them: k = 0, cadence, 2 cadence, ..., then the serving one), and
    never one holding a turn from after it began: where an earlier conversation went on past
    its start (two conversations at once), an earlier snapshot (`as_of` one tick after the
    last turn it holds, at or before the conversation's first turn)."""
    ordered = conversation_order(conversations)
    snapshots = [r for r in rows if not r["serving"]]
    links = []
    for i, c in enumerate(ordered):
        k = i // cadence
        while k > 0 and snapshots[k]["as_of"] > conversation_start(c):
            k -= 1
        links.append({"conversation_id": c["conversation_id"], "user_id": c["user_id"], "conversation_index": i,
                      "persona_id": snapshots[k]["persona_id"]})
    return links


def feedback_messages(followups: pa.Table) -> dict[str, list[str]]:
    """conversation_id -> the user's feedback follow-ups in it, in turn order."""
    rows = followups.select(["conversation_id", "turn_index", "message", "label"]).to_pylist()
    out: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: (r["conversation_id"], r["turn_index"])):
        if row["label"] in FEEDBACK_LABELS:
            out.setdefault(row["conversation_id"], []).append(row["message"])
    return out


def split_users(conversation_counts: dict[str, int], *, eval_fraction: float,
                min_eval_with_history: int, seed: int, earlier: dict[str, str] | None = None) -> pa.Table:
    """Train/eval split by a hash of the user key (stable as users are added), then the
    train users with history that hash lowest move to eval until the minimum is met.
    `earlier` (an earlier round's split) is kept as it was: a held-out user stays held out,
    and only users new to this round can move."""
    def rank(user: str) -> float:
        return int(hashlib.sha256(f"{seed}\x1f{user}".encode()).hexdigest()[:12], 16) / 16 ** 12

    earlier = earlier or {}
    users = sorted(conversation_counts, key=rank)
    split = {u: earlier.get(u) or ("eval" if rank(u) < eval_fraction else "train") for u in users}
    has_history = {u: conversation_counts[u] >= 2 for u in users}
    missing = min_eval_with_history - sum(1 for u in users if split[u] == "eval" and has_history[u])
    for user in users:
        if missing <= 0:
            break
        if split[user] == "train" and has_history[user] and user not in earlier:
            split[user], missing = "eval", missing - 1
    return pa.Table.from_pylist(
        [{"user_id": u, "split": split[u], "conversations": conversation_counts[u], "has_history": has_history[u]}
         for u in sorted(users)], schema=USERS)


# --- the stage on Ray Data ----------------------------------------------------------------

class PersonaWorker:
    """Ray Data callable class for `map_groups`: all persona rows of one user."""

    def __init__(self, settings_json: str, model: dict[str, Any]) -> None:
        from actors.persona_builder import PersonaBuilder
        from pipelines.redact import Redactor

        self.settings = PersonasConfig.model_validate_json(settings_json)
        self.builder = PersonaBuilder(self.settings.backend, model, max_persona_chars=self.settings.max_persona_chars)
        self.redactor = Redactor()

    def __call__(self, group: pa.Table) -> pa.Table:
        """One user's persona rows, each with the ids of the conversations that see it
        (`seen_by`, a list column the stage splits into `conversation_personas`)."""
        conversations = group.to_pylist()
        feedback = {row["conversation_id"]: row["feedback"] or [] for row in conversations}
        rows = user_snapshots(
            conversations, feedback, cadence=self.settings.cadence,
            max_conversations=self.settings.history_max_conversations,
            max_tokens=self.settings.history_max_tokens, backend=self.settings.backend,
            build=self.builder.build_batch, redact=self.redactor.redact_many)
        seen: dict[str, list[tuple[str, int]]] = {}
        for link in conversation_snapshots(conversations, rows, self.settings.cadence):
            seen.setdefault(link["persona_id"], []).append((link["conversation_id"], link["conversation_index"]))
        table = pa.Table.from_pylist(rows, schema=PERSONAS)
        return table.append_column("seen_by", pa.array(
            [[{"conversation_id": c, "conversation_index": i} for c, i in seen.get(r["persona_id"], [])] for r in rows],
            pa.list_(pa.struct([("conversation_id", pa.string()), ("conversation_index", pa.int32())]))))


def conversation_links(batch: pa.Table) -> pa.Table:
    """CONVERSATION_PERSONAS rows from PersonaWorker output (its `seen_by` column)."""
    rows = [{**seen, "user_id": r["user_id"], "persona_id": r["persona_id"]}
            for r in batch.select(["persona_id", "user_id", "seen_by"]).to_pylist() for seen in r["seen_by"]]
    return pa.Table.from_pylist(rows, schema=CONVERSATION_PERSONAS)


def with_feedback(conversations: pa.Table, followups: pa.Table) -> pa.Table:
    """The columns persona building reads, plus each conversation's feedback follow-ups."""
    feedback = feedback_messages(followups)
    table = conversations.select(["conversation_id", "user_id", "timestamp", "language", "toxic", "turns"])
    column = pa.array([feedback.get(cid, []) for cid in table.column("conversation_id").to_pylist()],
                      pa.list_(pa.string()))
    return table.append_column("feedback", column)


def run_personas(config: RunConfig, round_index: int = 0) -> dict[str, Any]:
    """Run the stage into `<run_dir>/personas/` (tables `personas` and `users`); in a
    served_logs round into its own folder, from the users' whole history so far."""
    import ray

    from pipelines.rounds import actor_gpus, history, ingest_rounds, latest_reads, upstream_round

    run_dir, settings = Path(config.run_dir), config.personas
    rounds = ingest_rounds(config, round_index)
    upstream = {step_name(k, name): require_stage(run_dir, name, k) for name in ("ingest", "followups") for k in rounds}
    conversations, latest = history(run_dir, rounds)
    followups = latest_reads({k: pq.read_table(table_path(run_dir, "followups", "followups", k), schema=FOLLOWUPS)
                              for k in rounds}, latest)
    table = with_feedback(conversations, followups)
    counts = Counter(table.column("user_id").to_pylist())
    earlier = user_splits(run_dir, upstream_round(config, STAGE, round_index - 1)) if round_index else None
    with StageWriter(run_dir, STAGE, round_index) as stage:
        workers = settings.workers or max(1, int(ray.available_resources().get("CPU", 1)))
        gpus = actor_gpus(config.models.persona) if settings.backend == "llm" else 0.0
        # Half a CPU per actor leaves room for the groupby's shuffle tasks: a pool holding
        # every CPU would wait forever for them on a small machine.
        dataset = ray.data.from_arrow(table).groupby("user_id").map_groups(
            PersonaWorker, batch_format="pyarrow", num_cpus=0.5, num_gpus=gpus,
            fn_constructor_kwargs={"settings_json": settings.model_dump_json(),
                                   "model": config.models.persona.model_dump()},
            compute=ray.data.ActorPoolStrategy(size=min(workers, max(len(counts), 1))))
        personas_dir, links_dir = stage.table_dir("personas"), stage.table_dir("conversation_personas")
        for index, batch in enumerate(dataset.iter_batches(batch_format="pyarrow", batch_size=None)):
            pq.write_table(batch.select(PERSONAS.names), personas_dir / f"part-{index:06d}.parquet")
            pq.write_table(conversation_links(batch), links_dir / f"part-{index:06d}.parquet")
        personas = pq.read_table(personas_dir, schema=PERSONAS)
        check_schema(personas, PERSONAS, "personas")
        links = pq.read_table(links_dir, schema=CONVERSATION_PERSONAS)
        if links.num_rows != table.num_rows:
            raise RuntimeError(f"personas: {table.num_rows} conversations but {links.num_rows} have a persona")
        users = split_users(dict(counts), eval_fraction=settings.eval_fraction, earlier=earlier,
                            min_eval_with_history=settings.min_eval_users_with_history, seed=config.seed)
        pq.write_table(users, stage.table_dir("users") / "part-0.parquet")
        rows = personas.select(["persona", "serving", "redactions"]).to_pylist()
        summary = {
            "users": len(counts), "snapshots": sum(1 for r in rows if not r["serving"]),
            "empty_personas": sum(1 for r in rows if not r["serving"] and r["persona"] == ""),
            "serving_personas": sum(1 for r in rows if r["serving"]),
            "redactions": sum(r["redactions"] for r in rows),
            "split": dict(Counter(users.column("split").to_pylist())),
            "eval_users_with_history": sum(1 for u in users.to_pylist() if u["split"] == "eval" and u["has_history"]),
            "backend": settings.backend,
        }
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, upstream=upstream,
                     models=[config.models.persona.model_dump()] if settings.backend == "llm" else [],
                     counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE, round_index))
    return summary
