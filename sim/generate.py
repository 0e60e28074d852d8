"""Simulated users talk to a policy; their conversations are written as WildChat logs.

    rlhi sim generate --users N --out DIR [--seed S] [--model ID]

writes
- `DIR/logs/conversations.parquet`: WildChat's exact Hub schema (nothing else in `logs/`), a
  stable `hashed_ip` per user, UTC timestamps; `rlhi ingest --input DIR/logs` reads it as is;
- `DIR/profiles.jsonl`: the hidden profiles (never read by the pipeline);
- `DIR/followup_labels.jsonl`: each follow-up's label by construction, in the gold-label
  format of `data/wildchat/followup_labels.jsonl` (so `rlhi eval-followups` scores on it).

All conversations advance in lockstep, one policy answer per live conversation per round,
so the engine sees large batches: that is what keeps 200 users to minutes on a CPU.
Everything is drawn from `random.Random` seeded per user and conversation, so a seed gives
the same users, requests and reactions (answers also repeat with a seeded engine).
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from actors.engines import GenerationEngine, SamplingParams, make_engine
from actors.models import ModelSpec
from sim.feedback import FollowUp, feedback_message, thanks_message
from sim.phrasings import Bank, load_bank
from sim.profiles import Profile, check_answer, sample_profile
from sim.requests import SAMPLE, make_request

SCHEMA = pq.read_schema(SAMPLE)  # WildChat's Hub schema, declared once by the data itself
START = datetime(2024, 3, 1, tzinfo=timezone.utc)
MAX_ANSWERS = 4            # policy answers per conversation at most
MAX_FEEDBACK = 2           # a user gives up after this much feedback in one conversation
CONTEXT_MESSAGES = 5       # the policy sees this many latest messages (bounds CPU cost)
LEAVE_AFTER_DROP = 0.6     # a user who drops a bad answer leaves, else asks something new
LEAVE_WHEN_SATISFIED = 0.35
PLACES = [("United States", "California", "en-US,en;q=0.9"), ("United Kingdom", "England", "en-GB,en;q=0.8"),
          ("India", "Karnataka", "en-IN,en;q=0.9"), ("Canada", "Ontario", "en-CA,en;q=0.9"),
          ("Australia", "Victoria", "en-AU,en;q=0.9")]
AGENTS = ["Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 Version/17.0 Safari/605.1.15",
          "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"]


@dataclass
class Conversation:
    """One simulated conversation in progress."""

    profile: Profile
    index: int                      # the user's n-th conversation
    rng: random.Random
    started: datetime
    messages: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)   # one per follow-up
    request: str = ""
    feedback_given: int = 0
    judge_next: bool = True         # the next answer is to the request (not to thanks)
    done: bool = False

    @property
    def conversation_hash(self) -> str:
        """Stable per user and conversation (WildChat's own is a hash of the text)."""
        return hashlib.md5(f"{self.profile.hashed_ip}/{self.index}".encode()).hexdigest()

    def user_says(self, text: str, followup: FollowUp | None = None) -> None:
        """Append a user message; a follow-up also records its label by construction."""
        if followup is not None:
            self.labels.append({"conversation_hash": self.conversation_hash,
                                "message_index": len(self.messages), "label": followup.label,
                                "feedback": followup.kind in ("reattempt", "correction", "complaint"),
                                "named": list(followup.named)})
        self.messages.append({"role": "user", "content": text})


def make_users(n: int, seed: int, family: str = "eval") -> list[Profile]:
    """`n` hidden profiles, the same for the same seed and family. Another family's users
    are other people (other profiles, ids, conversations, held-out requests and split):
    tuning on `--family dev --seed 0` never sees the users reported at the evaluation seed 0."""
    population = str(seed) if family == "eval" else f"{family}/{seed}"
    return [sample_profile(random.Random(f"{population}/user/{i}"), i,
                           hashlib.sha256(f"sim/{population}/{i}".encode()).hexdigest())
            for i in range(n)]


def draw_topic(profile: Profile, rng: random.Random) -> str:
    topics = sorted(profile.topics)
    return rng.choices(topics, weights=[profile.topics[t] for t in topics])[0]


def react(conv: Conversation, answer: str, bank: Bank) -> None:
    """The user reads `answer` and replies in the words of `bank`, moves on, or leaves (sets
    `conv.done`)."""
    rng, profile = conv.rng, conv.profile
    answers = sum(m["role"] == "assistant" for m in conv.messages)
    if answers >= MAX_ANSWERS:
        conv.done = True
        return
    # Answers to a request or to feedback on it are judged; a reply to thanks is not.
    check = check_answer(profile.preferences, answer) if conv.judge_next else None
    conv.judge_next = True
    if check is not None and check.score < 1.0:
        if conv.feedback_given < MAX_FEEDBACK and rng.random() < profile.persistence:
            kinds = sorted(profile.feedback_kinds)
            kind = rng.choices(kinds, weights=[profile.feedback_kinds[k] for k in kinds])[0]
            followup = feedback_message(kind, conv.request, check.violated, check.measured, rng, bank)
            conv.feedback_given += 1
            conv.user_says(followup.text, followup)
            return
        conv.done = rng.random() < LEAVE_AFTER_DROP  # dropped without a word
    elif check is not None and rng.random() < profile.gratitude:
        thanks = thanks_message(rng, bank)
        conv.user_says(thanks.text, thanks)
        conv.judge_next = False
        return
    elif rng.random() < LEAVE_WHEN_SATISFIED:
        conv.done = True
    if not conv.done:
        conv.request = make_request(draw_topic(profile, rng), rng)
        conv.feedback_given = 0
        conv.user_says(conv.request, FollowUp(conv.request, "new_request"))


def _context(conv: Conversation) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in conv.messages[-CONTEXT_MESSAGES:]]


def simulate(profiles: list[Profile], engine: GenerationEngine, params: SamplingParams, bank: Bank,
             log: Callable[[str], None] = lambda s: None) -> list[Conversation]:
    """Run every user's conversations to the end against `engine`, the users speaking in the
    words of `bank`; returns them."""
    convs = []
    for p in profiles:
        for c in range(p.conversations):
            rng = random.Random(f"{p.hashed_ip}/{c}")
            started = START + timedelta(days=3 * p.user_index / max(len(profiles), 1) + 2 * c,
                                        minutes=rng.randint(0, 600))
            conv = Conversation(p, c, rng, started)
            conv.request = make_request(draw_topic(p, rng), rng)
            conv.user_says(conv.request)
            convs.append(conv)
    live = convs
    round_ = 0
    while live:
        round_ += 1
        t0 = time.perf_counter()
        outputs = engine.generate([_context(c) for c in live], params)
        for conv, out in zip(live, outputs):
            # Blank answers would be rejected by ingest; say so rather than drop the turn.
            answer = out[0].text.strip() or "(no answer)"
            conv.messages.append({"role": "assistant", "content": answer})
            react(conv, answer, bank)
        live = [c for c in live if not c.done]
        log(f"round {round_}: {len(outputs)} answers in {time.perf_counter() - t0:.1f}s, "
            f"{len(live)} conversations still live")
    return convs


def _moderation() -> dict:
    """An unflagged moderation entry (WildChat has one per message; the sim has no scores)."""
    cats = [f.name for f in SCHEMA.field("openai_moderation").type.value_type.field("categories").type]
    return {"categories": dict.fromkeys(cats, False), "category_scores": dict.fromkeys(cats, 0.0),
            "flagged": False}


def wildchat_row(conv: Conversation, first_turn_id: int, model: str) -> dict:
    """`conv` as one row of WildChat's Hub schema (turn identifiers from `first_turn_id`)."""
    profile = conv.profile
    country, state, accept_language = PLACES[profile.user_index % len(PLACES)]
    header = {"accept-language": accept_language, "user-agent": AGENTS[profile.user_index % len(AGENTS)]}
    turns = []
    for i, m in enumerate(conv.messages):
        turns.append({"content": m["content"], "country": country, "hashed_ip": profile.hashed_ip,
                      "header": header, "language": "English", "redacted": False, "role": m["role"],
                      "state": state, "timestamp": conv.started + timedelta(minutes=i),
                      "toxic": False, "turn_identifier": first_turn_id + i})
    detox = dict.fromkeys(["identity_attack", "insult", "obscene", "severe_toxicity",
                           "sexual_explicit", "threat", "toxicity"], 0.0)
    return {"conversation_hash": conv.conversation_hash, "model": model, "timestamp": conv.started,
            "conversation": turns, "turn": sum(m["role"] == "user" for m in conv.messages),
            "language": "English", "openai_moderation": [_moderation() for _ in turns],
            "detoxify_moderation": [dict(detox) for _ in turns], "toxic": False, "redacted": False,
            "state": state, "country": country, "hashed_ip": profile.hashed_ip, "header": header}


def write_outputs(out: Path, convs: list[Conversation], profiles: list[Profile], model: str) -> dict:
    """Write logs, profiles and labels under `out`; returns counts."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.iterdir():  # "nothing else in logs/": a rerun replaces, never mixes
        stale.unlink()
    rows, turn_id = [], 1
    for conv in sorted(convs, key=lambda c: c.started):
        rows.append(wildchat_row(conv, turn_id, model))
        turn_id += len(conv.messages)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), logs / "conversations.parquet")
    with open(out / "profiles.jsonl", "w") as f:
        f.writelines(json.dumps(p.to_json()) + "\n" for p in profiles)
    labels = [lab for conv in convs for lab in conv.labels]
    with open(out / "followup_labels.jsonl", "w") as f:
        f.writelines(json.dumps(lab) + "\n" for lab in labels)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab["label"]] = counts.get(lab["label"], 0) + 1
    return {"conversations": len(rows), "messages": turn_id - 1, "followups": counts}


def generate_logs(users: int, out: str | Path, *, seed: int = 0, model: str | None = None,
                  engine: GenerationEngine | None = None, max_new_tokens: int = 160,
                  temperature: float = 1.0, batch_size: int = 64, family: str = "eval",
                  log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict:
    """Simulate `users` users against a policy and write their logs under `out`; the users
    speak in the phrasing family `family` (sim/phrasings.py).

    The policy is `engine` if given, else `model` (a ModelSpec id: Hub id, folder or alias
    such as `smollm2-135m-instruct`), else the warm-start policy, built on first use.
    Returns a summary: counts, the mean checker score of first answers, seconds taken.
    """
    if users < 1:
        raise ValueError(f"--users must be at least 1, got {users}")
    t0 = time.perf_counter()
    if engine is None:
        if model is None:
            from sim.warmstart import ensure_warmstart

            model = str(ensure_warmstart(log))
        engine = make_engine(ModelSpec(id=model, engine="transformers", batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, seed=seed))
    profiles = make_users(users, seed, family)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95,
                            seed=seed)
    convs = simulate(profiles, engine, params, load_bank(family), log)
    first_scores = [check_answer(c.profile.preferences, c.messages[1]["content"]).score for c in convs]
    summary = write_outputs(Path(out), convs, profiles, Path(model or "engine").name)
    summary |= {"users": users, "seed": seed, "model": model, "family": family,
                "mean_first_answer_score": round(sum(first_scores) / len(first_scores), 4),
                "seconds": round(time.perf_counter() - t0, 1), "output": str(Path(out).resolve())}
    return summary
