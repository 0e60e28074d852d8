"""Where the experiment's signal is lost: each link of the pipeline scored against the hidden
profiles (`rlhi sim run --decompose`).

- extractor: does `message_preferences` read what simulated feedback names, per phrasing
  family (message-level exact match, the family's free-form messages too);
- personas: do held-out users' serving personas state values their hidden profile holds
  (precision) and how many of the profile's preferences they state (coverage);
- rewriter: the rewrites' fix rate (the rewrite has every value the feedback named) and
  keep rate (it leaves the properties the feedback did not name as they were);
- pairs: the checker's chosen - rejected over the train pairs, per source;
- reward model: agreement with the checker on held-out users' candidate pairs (pairs of
  candidates of one prompt the checker tells apart).
Plus the oracle arms' inputs: the hidden profile as a persona (`oracle_persona`), and pairs
the checker ranks among the policy's own samples for training users (`oracle_pairs`).
Only this module and the checker read `profiles.jsonl`.
"""
from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from actors.persona_extractive import DIMENSIONS, message_preferences
from pipelines.persona_join import user_splits
from pipelines.schema import table_path
from sim.feedback import feedback_message
from sim.phrasings import FAMILIES, load_bank
from sim.profiles import PROPERTIES, Profile, check_answer, measure

# The simulator's property values in the persona's vocabulary (actors/persona_extractive.py).
TO_PERSONA = {"length": ("length", {"short": "short", "medium": "medium", "long": "long"}),
              "format": ("format", {"bullets": "structured", "prose": "prose"}),
              "register": ("register", {"formal": "formal", "casual": "casual"}),
              "example": ("examples", {"with_example": "yes", "no_example": "no"}),
              "ending": ("ending", {"question": "question", "statement": "statement"})}
FROM_PERSONA = {(dim, name): (prop, value) for prop, (dim, names) in TO_PERSONA.items() for value, name in names.items()}
PHRASE_VALUE = {phrase: FROM_PERSONA.get((dim, name)) for dim, names in DIMENSIONS.items()
                for name, phrase in names.items()}


def persona_values(persona: str) -> dict[str, str]:
    """The sim property values a persona's "Stated preferences" line states."""
    line = next((ln for ln in persona.splitlines() if ln.startswith("Stated preferences: ")), "")
    found = [PHRASE_VALUE.get(p) for p in line.removeprefix("Stated preferences: ").split("; ")]
    return dict(v for v in found if v)


def oracle_persona(profile: Profile) -> str:
    """The hidden profile as a persona line, in the extractor's own phrases."""
    phrases = [DIMENSIONS[TO_PERSONA[p][0]][TO_PERSONA[p][1][v]] for p, v in sorted(profile.preferences.items())]
    return "Stated preferences: " + "; ".join(phrases) if phrases else ""


def _as_persona_vocabulary(values: dict[str, str]) -> dict[str, str]:
    return {TO_PERSONA[p][0]: TO_PERSONA[p][1][v] for p, v in values.items()}


def extractor_accuracy(n: int = 400, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per family: exact match of `message_preferences` on `n` simulated re-attempts and
    corrections (what the feedback names, against what the profile wants), and on the
    family's free-form messages."""
    out = {}
    for family in FAMILIES:
        bank, rng = load_bank(family), random.Random(f"extractor/{family}/{seed}")
        simulated = []
        for _ in range(n):
            wanted = {p: rng.choice(PROPERTIES[p]) for p in rng.sample(sorted(PROPERTIES), k=rng.randint(1, 3))}
            got = {p: rng.choice([v for v in PROPERTIES[p] if v != w]) for p, w in wanted.items()}
            msg = feedback_message(rng.choice(("reattempt", "correction")), "How do I cook rice", wanted, got,
                                   rng, bank)
            simulated.append((msg.text, {p: wanted[p] for p in msg.named}))
        out[family] = {"simulated_feedback_exact": _exact(simulated), "messages_exact": _exact(bank.messages),
                       "simulated": len(simulated), "messages": len(bank.messages)}
    return out


def _exact(items) -> float:
    hits = 0
    for text, states in items:
        read = {d: v for d, v in message_preferences(text) if d != "code"}
        hits += read == _as_persona_vocabulary(states)
    return round(hits / max(len(items), 1), 4)


def persona_accuracy(run_dir: Path, profiles: dict[str, Profile]) -> dict[str, float]:
    """Held-out users' serving personas against their hidden profiles."""
    personas = pq.read_table(table_path(run_dir, "personas", "personas"), columns=["user_id", "persona", "serving"])
    serving = {r["user_id"]: r["persona"] for r in personas.to_pylist() if r["serving"]}
    held_out = [u for u, split in user_splits(run_dir).items() if split == "eval"]
    stated = correct = wanted = 0
    for user in held_out:
        values, profile = persona_values(serving.get(user, "")), profiles[user].preferences
        stated += len(values)
        correct += sum(profile.get(p) == v for p, v in values.items())
        wanted += len(profile)
    return {"users": len(held_out), "precision": round(correct / max(stated, 1), 4),
            "coverage": round(correct / max(wanted, 1), 4), "stated_per_user": round(stated / max(len(held_out), 1), 3)}


def rewriter_rates(run_dir: Path, profiles: dict[str, Profile], labels_file: Path) -> dict[str, float]:
    """Fix and keep rates of every rewrite made (kept or filtered by the quality filter)."""
    conversations = pq.read_table(table_path(run_dir, "ingest", "conversations"),
                                  columns=["conversation_id", "conversation_hash"])
    hash_of = dict(zip(conversations.column("conversation_id").to_pylist(),
                       conversations.column("conversation_hash").to_pylist()))
    named = {(r["conversation_hash"], r["message_index"]): r.get("named") or []
             for r in map(json.loads, labels_file.read_text().splitlines())}
    rewrites = pq.read_table(table_path(run_dir, "rewrites", "rewrites")).to_pylist()
    fixed = kept_rest = counted = 0
    for row in rewrites:
        props = named.get((hash_of.get(row["conversation_id"]), row["turn_index"]))
        if not row["chosen"] or not row["rejected"] or not props:
            continue
        wanted, new, old = profiles[row["user_id"]].preferences, measure(row["chosen"]), measure(row["rejected"])
        counted += 1
        fixed += all(new[p] == wanted[p] for p in props)
        kept_rest += all(new[q] == old[q] for q in PROPERTIES if q not in props)
    return {"rewrites": counted, "fix_rate": round(fixed / max(counted, 1), 4),
            "keep_rate": round(kept_rest / max(counted, 1), 4)}


def pair_quality(run_dir: Path, profiles: dict[str, Profile]) -> dict[str, dict[str, float]]:
    """Per pair source, over the run's train pairs: the checker's chosen - rejected, and how
    often chosen is better or worse. What DPO can learn from the pairs at most."""
    diffs: dict[str, list[float]] = {}
    for row in pq.read_table(table_path(run_dir, "pairs", "pairs")).to_pylist():
        if row["split"] == "train":
            prefs = profiles[row["user_id"]].preferences
            diffs.setdefault(row["source"], []).append(
                check_answer(prefs, row["chosen"][-1]["content"]).score
                - check_answer(prefs, row["rejected"][-1]["content"]).score)
    return {source: {"pairs": len(d), "chosen_minus_rejected": round(sum(d) / len(d), 4),
                     "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}
            for source, d in sorted(diffs.items())}


def reward_model_agreement(run_dir: Path, profiles: dict[str, Profile]) -> dict[str, float]:
    """How often the run's reward scores order two candidates of a held-out user's prompt as
    the checker does, over the candidate pairs the checker tells apart."""
    splits = user_splits(run_dir)
    agree = total = 0
    for row in pq.read_table(table_path(run_dir, "rewards", "samples")).to_pylist():
        if splits.get(row["user_id"]) != "eval" or len(row["scores"]) < 2:
            continue
        checker = [check_answer(profiles[row["user_id"]].preferences, c).score for c in row["candidates"]]
        for i, j in combinations(range(len(checker)), 2):
            if checker[i] != checker[j] and row["scores"][i] != row["scores"][j]:
                total += 1
                agree += (checker[i] > checker[j]) == (row["scores"][i] > row["scores"][j])
    return {"candidate_pairs": total, "agreement": round(agree / max(total, 1), 4)}


def oracle_pairs(run_dir: Path, profiles: dict[str, Profile]) -> list[dict[str, Any]]:
    """PAIRS rows: among each training user's sampled candidates (the rewards stage's
    samples), the one the hidden checker likes best against the one it likes least, with
    the pipeline's persona in the prompt. What DPO can learn from this many right pairs."""
    from pipelines.stages.pairs import pair_id

    splits = user_splits(run_dir)
    rows = []
    for s in pq.read_table(table_path(run_dir, "rewards", "samples")).to_pylist():
        if splits.get(s["user_id"]) != "train" or len(s["candidates"]) < 2:
            continue
        scores = [check_answer(profiles[s["user_id"]].preferences, c).score for c in s["candidates"]]
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if scores[best] == scores[worst] or s["candidates"][best].strip() == s["candidates"][worst].strip():
            continue
        rows.append({"pair_id": pair_id("oracle", s["sample_id"], 0), "prompt": s["prompt"],
                     "chosen": [{"role": "assistant", "content": s["candidates"][best]}],
                     "rejected": [{"role": "assistant", "content": s["candidates"][worst]}],
                     "user_id": s["user_id"], "split": "train", "source": "reward",
                     "margin": scores[best] - scores[worst], "persona_id": s["persona_id"],
                     "conversation_id": s["conversation_id"], "followup_id": None, "sample_id": s["sample_id"],
                     "round": 0})
    return rows
