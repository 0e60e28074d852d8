"""Hidden user profiles over checkable answer properties, and the checker that scores them.

A simulated user wants one value of each property below. Every property is measured from
the answer's surface with a fixed rule, so the checker is deterministic and a reader can
verify any score by hand: that is what makes simulated users useful where real logs are not
(nobody knows what WildChat users really wanted; here we do).

Answer language is not a property yet: the warm-start policy writes English only, so a
language preference could never be satisfied and would only add noise.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

# property -> its values, in a fixed order (profiles and SFT data enumerate them).
PROPERTIES: dict[str, tuple[str, ...]] = {
    "length": ("short", "medium", "long"),
    "format": ("bullets", "prose"),
    "register": ("formal", "casual"),
    "example": ("with_example", "no_example"),
    "ending": ("question", "statement"),
}
TOPICS = ("coding", "writing", "science", "cooking", "travel", "career", "wildchat")

# Word-count bands; kept small so a tiny CPU model can reach "long" in ~192 new tokens.
SHORT_MAX_WORDS, MEDIUM_MAX_WORDS = 40, 100
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
BULLET_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.MULTILINE)
MIN_BULLETS = 2
EXAMPLE_MARKERS = re.compile(r"\b(?:for example|for instance|e\.g\.|example:|say you)", re.IGNORECASE)
CASUAL_MARKERS = re.compile(
    r"\b(?:hey|gonna|wanna|kinda|pretty much|stuff|cool|awesome|yeah|folks|super easy|"
    r"\w+'(?:s|re|ll|ve|d|t))\b|!", re.IGNORECASE)
MIN_CASUAL_MARKERS = 2


def measure(answer: str) -> dict[str, str]:
    """The value of every property that `answer` has, by the fixed surface rules above."""
    words = len(WORD.findall(answer))  # bullet markers and punctuation are not words
    length = "short" if words <= SHORT_MAX_WORDS else "medium" if words <= MEDIUM_MAX_WORDS else "long"
    return {
        "length": length,
        "format": "bullets" if len(BULLET_LINE.findall(answer)) >= MIN_BULLETS else "prose",
        "register": "casual" if len(CASUAL_MARKERS.findall(answer)) >= MIN_CASUAL_MARKERS else "formal",
        "example": "with_example" if EXAMPLE_MARKERS.search(answer) else "no_example",
        "ending": "question" if answer.rstrip().endswith("?") else "statement",
    }


@dataclass(frozen=True)
class Profile:
    """One simulated user's hidden preferences and behaviour. Never shown to the pipeline.

    `preferences` maps each property it cares about to the wanted value (a user may not
    care about every property). `topics` is the user's topic mix (weights sum to 1).
    `persistence` is the chance of giving feedback on a bad answer rather than dropping it;
    `feedback_kinds` weights the kinds of feedback this user tends to give.
    """

    user_index: int
    hashed_ip: str
    preferences: dict[str, str]
    topics: dict[str, float]
    persistence: float
    feedback_kinds: dict[str, float]
    gratitude: float
    conversations: int
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-ready dict (one line of DIR/profiles.jsonl)."""
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """How an answer fares against a profile: the fraction satisfied and what fell short."""

    score: float
    violated: dict[str, str]   # property -> the value the user wanted
    measured: dict[str, str]


def check_answer(preferences: dict[str, str], answer: str) -> Check:
    """Score `answer` against `preferences`: the fraction of preferences it satisfies."""
    got = measure(answer)
    violated = {p: want for p, want in preferences.items() if got[p] != want}
    score = 1.0 - len(violated) / len(preferences) if preferences else 1.0
    return Check(score, violated, got)


def sample_profile(rng: random.Random, user_index: int, hashed_ip: str,
                   max_conversations: int = 4) -> Profile:
    """Draw one user's profile; the same rng state always gives the same profile."""
    cared = rng.sample(sorted(PROPERTIES), k=rng.randint(2, len(PROPERTIES)))
    preferences = {p: rng.choice(PROPERTIES[p]) for p in sorted(cared)}
    # A topic mix concentrated on two or three topics, as real users' histories are.
    weights = [rng.random() ** 3 for _ in TOPICS]
    total = sum(weights)
    topics = {t: round(w / total, 4) for t, w in zip(TOPICS, weights)}
    kinds = [rng.random() + 0.2 for _ in range(3)]
    feedback_kinds = {k: round(w / sum(kinds), 4)
                      for k, w in zip(("reattempt", "correction", "complaint"), kinds)}
    return Profile(user_index=user_index, hashed_ip=hashed_ip, preferences=preferences,
                   topics=topics, persistence=round(rng.uniform(0.5, 0.95), 3),
                   feedback_kinds=feedback_kinds, gratitude=round(rng.uniform(0.2, 0.8), 3),
                   conversations=rng.randint(1, max_conversations))
