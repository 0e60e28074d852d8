"""What the evaluate stage asks: evaluation users' turns, benchmark items, known-answer pairs.

UserEval turns come from the ingest stage's conversations of users in the `eval` split
(personas stage): a first turn is a conversation's opening user message; a follow-up turn is
a user turn right after an assistant answer, its context the conversation up to and
including it. The persona is the snapshot built from the user's conversations before the
turn's own (`attach_personas`), so it never contains the turn or anything after it.

In a run whose online rounds read the chat log (`online.source: served_logs`), the users'
conversations are every round's ingest (a conversation that continued, as last read), and
splits and personas are the newest round's, which hold that whole history.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import BenchmarkConfig, RunConfig
from pipelines.persona_join import attach_personas, user_splits
from pipelines.rounds import history, ingest_rounds, upstream_round
from pipelines.stages.evaluate import reasoning

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class EvalItem:
    """One prompt both arms answer: a user turn, a benchmark problem or an Arena question."""

    item_id: str
    user_id: str           # the bootstrap's cluster: the user, or the item itself
    kind: str              # "first", "followup", "gsm8k", "math500", "arena_hard"
    context: list[dict[str, str]]
    persona: str = ""      # the snapshot built before the turn's conversation ("" if none)


def benchmark_path(path: str) -> Path:
    """A relative path is read from the working directory, else from the repository."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() or candidate.exists() else REPO / path


def user_turns(config: RunConfig) -> dict[str, list[EvalItem]]:
    """Evaluation users' first and follow-up turns, at most `max_turns` of each, drawn
    round-robin over users (seeded) so the bootstrap over users has as many users as it can."""
    run_dir, last = Path(config.run_dir), config.online.rounds
    personas_round = upstream_round(config, "personas", last)
    eval_users = {u for u, split in user_splits(run_dir, personas_round).items() if split == "eval"}
    conversations, _ = history(run_dir, ingest_rounds(config, last))
    found: dict[str, list[tuple[EvalItem, Any]]] = {"first": [], "followup": []}
    for conv in conversations.select(["conversation_id", "user_id", "system", "turns"]).to_pylist():
        if conv["user_id"] not in eval_users:
            continue
        turns = conv["turns"] or []
        # The conversation's own system message comes first, as in the prompts the run trained on.
        prefix = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
        for i, turn in enumerate(turns):
            kind = "first" if i == 0 else "followup" if turns[i - 1]["role"] == "assistant" else None
            if turn["role"] != "user" or kind is None:
                continue
            context = prefix + [{"role": t["role"], "content": t["content"] or ""} for t in turns[:i + 1]]
            item = EvalItem(f"{conv['conversation_id']}:{i}", conv["user_id"], kind, context)
            found[kind].append((item, conv["conversation_id"]))
    return {kind: _with_personas(_round_robin(rows, config.evaluate.max_turns, config.seed), run_dir, personas_round)
            for kind, rows in found.items()}


def _round_robin(rows: list[tuple[EvalItem, Any]], n: int, seed: int) -> list[tuple[EvalItem, Any]]:
    rng = random.Random(seed)
    by_user: dict[str, list] = {}
    for row in sorted(rows, key=lambda r: r[0].item_id):
        by_user.setdefault(row[0].user_id, []).append(row)
    queues = [by_user[u] for u in sorted(by_user)]
    rng.shuffle(queues)
    for queue in queues:
        rng.shuffle(queue)
    picked = []
    while len(picked) < n and any(queues):
        picked += [queue.pop() for queue in queues if queue][:n - len(picked)]
    return picked


def _with_personas(rows: list[tuple[EvalItem, Any]], run_dir: Path, round_index: int) -> list[EvalItem]:
    import pandas as pd

    if not rows:
        return []
    frame = pd.DataFrame({"user_id": [r[0].user_id for r in rows], "conversation_id": [r[1] for r in rows]})
    personas = attach_personas(frame, run_dir, user_agnostic=False, round_index=round_index)["persona"]
    return [EvalItem(**{**asdict(item), "persona": persona}) for (item, _), persona in zip(rows, personas)]


def benchmark_items(kind: str, bench: BenchmarkConfig, seed: int) -> list[tuple[EvalItem, Any]]:
    """(item, problem) pairs of one benchmark: problems for reasoning, None for Arena."""
    path = benchmark_path(bench.path)
    if kind == "arena_hard":
        rows = reasoning.select(reasoning.read_jsonl(path, ("uid", "prompt")), bench.n, bench.subset, seed)
        return [(EvalItem(row["uid"], row["uid"], kind, [{"role": "user", "content": row["prompt"]}]), None)
                for _, row in rows]
    load = reasoning.load_gsm8k if kind == "gsm8k" else reasoning.load_math500
    return [(EvalItem(p.item_id, p.item_id, kind, [{"role": "user", "content": p.prompt}]), p)
            for p in load(path, bench.n, bench.subset, seed)]


def known_pairs(bench: BenchmarkConfig, n: int, seed: int) -> list[tuple[EvalItem, str, str]]:
    """(item, better, worse) pairs with a known answer, from GSM8K's first `n` solutions:
    the gold solution against a wrong final number, and against its words shuffled and cut."""
    rows = reasoning.read_jsonl(benchmark_path(bench.path), ("question", "answer"))[:n]
    rng, pairs = random.Random(seed), []
    for i, row in enumerate(rows):
        body, gold = row["answer"].rsplit("####", 1)
        body = re.sub(r"<<[^>]*>>", "", body).strip()
        good = f"{body}\nThe answer is {gold.strip()}."
        wrong = f"{body}\nThe answer is {_wrong_number(reasoning.gsm8k_gold(row['answer']))}."
        shuffled = good.split()
        rng.shuffle(shuffled)
        context = [{"role": "user", "content": row["question"]}]
        pairs.append((EvalItem(f"gsm8k-{i}", f"gsm8k-{i}", "wrong_final", context), good, wrong))
        pairs.append((EvalItem(f"gsm8k-{i}", f"gsm8k-{i}", "scrambled", context), good,
                      " ".join(shuffled[:max(1, len(shuffled) // 2)])))
    return pairs


def _wrong_number(gold: str) -> str:
    value = float(gold)
    wrong = value * 2 + 3
    return str(int(wrong)) if wrong.is_integer() else f"{wrong:g}"
