"""Where simulated users' requests come from: the bundled WildChat sample and templates.

Never from `data/eval/`: evaluation sets stay uncontaminated. WildChat first turns give the
`wildchat` topic its realistic, messy requests; templates give every other topic enough
variety for hundreds of users.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import pyarrow.parquet as pq

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "wildchat" / "train-00000-of-00001.parquet"
MIN_CHARS, MAX_CHARS = 15, 300  # no bare greetings, no pasted documents
# Unflagged by moderation but asks for non-consensual image editing: not a request to replay.
EXCLUDED_PHRASES = ("removing man clothes",)

TEMPLATES = {
    "coding": ["How do I {x} in Python?", "Explain how to {x}.", "What's the best way to {x}?"],
    "writing": ["Help me {x}.", "Can you {x}?", "Give me tips to {x}."],
    "science": ["Why does {x}?", "Explain why {x}.", "What happens when {x}?"],
    "cooking": ["How do I {x}?", "Any advice on how to {x}?", "Teach me to {x}."],
    "travel": ["How should I {x}?", "Tips to {x}?", "What do I need to know to {x}?"],
    "career": ["How can I {x}?", "Advice on how to {x}, please.", "What's a good way to {x}?"],
}
FILLS = {
    "coding": ["read a CSV file", "sort a list of dictionaries", "write a unit test", "fix an import error",
               "parse JSON from an API", "speed up a slow loop", "reverse a string"],
    "writing": ["write a cover letter", "start a short story", "tighten my essay intro",
                "write a wedding toast", "edit a blog post", "write a product description"],
    "science": ["the sky look blue", "ice float on water", "a magnet attract iron",
                "the moon change shape", "bread rise in the oven", "salt melt ice"],
    "cooking": ["make fresh pasta", "cook rice without it sticking", "bake sourdough bread",
                "make a simple curry", "roast vegetables", "fry an egg perfectly"],
    "travel": ["plan a week in Japan", "pack for a long flight", "travel cheaply in Europe",
               "avoid jet lag", "get around Paris by metro", "plan a road trip"],
    "career": ["ask for a raise", "prepare for a job interview", "switch careers into data science",
               "write a strong resume", "handle a difficult manager", "negotiate a job offer"],
}


@lru_cache(maxsize=1)
def wildchat_first_turns(path: str = str(SAMPLE)) -> tuple[str, ...]:
    """English, unflagged first user turns of the bundled sample, of request length."""
    rows = pq.read_table(path, columns=["conversation", "language", "toxic",
                                        "openai_moderation"]).to_pylist()
    out = []
    for row in rows:
        flagged = row["toxic"] or any(m["flagged"] for m in row["openai_moderation"] or [])
        first = (row["conversation"] or [{}])[0]
        text = (first.get("content") or "").strip()
        if (row["language"] == "English" and not flagged and first.get("role") == "user"
                and MIN_CHARS <= len(text) <= MAX_CHARS
                and not any(p in text.lower() for p in EXCLUDED_PHRASES)):
            out.append(text)
    return tuple(out)


def make_request(topic: str, rng: random.Random) -> str:
    """One request on `topic` (`wildchat` draws a real first turn from the sample)."""
    if topic == "wildchat":
        return rng.choice(wildchat_first_turns())
    return rng.choice(TEMPLATES[topic]).format(x=rng.choice(FILLS[topic]))
