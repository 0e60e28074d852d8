"""Synthetic answers with chosen property values: the warm-start policy's SFT data.

`write_answer` composes an answer from neutral topic sentences plus register-, example- and
ending-specific pieces until it has exactly the wanted value of every property (checked with
`profiles.measure`, so the data and the checker can never disagree). Training a tiny model on
answers covering every value makes its own answers vary along the properties, which gives
preference learning something to move.
"""
from __future__ import annotations

import random

from sim.profiles import MIN_BULLETS, PROPERTIES, measure

# Neutral sentences (no contractions, no "!"): usable in either register.
TOPIC_SENTENCES = {
    "coding": ["Start by splitting the task into small functions.", "Write a test for each case first.",
               "Read the error message from the bottom up.", "Keep the data in a simple list.",
               "Name each variable after what it holds.", "Run the code after every small change."],
    "writing": ["Open with the main idea in one sentence.", "Give each paragraph one point.",
                "Cut words that add nothing.", "Read the draft aloud to hear the rhythm.",
                "End with a line the reader will remember.", "Use concrete nouns and active verbs."],
    "science": ["The effect depends on temperature and pressure.", "Energy is conserved in the process.",
                "Measure twice and record every reading.", "The model is a simplification of reality.",
                "Compare the result with a control group.", "Small errors grow when steps repeat."],
    "cooking": ["Heat the pan before adding the oil.", "Salt the water well before the pasta goes in.",
                "Let the dough rest for an hour.", "Taste the sauce and adjust the seasoning.",
                "Cut the vegetables to the same size.", "Rest the meat before slicing it."],
    "travel": ["Book the train early for the best fares.", "Carry a copy of your passport.",
               "Pack light and layer your clothes.", "Check the opening hours before you go.",
               "Learn a few words of the local language.", "Keep some cash for small shops."],
    "career": ["List what you achieved, not only what you did.", "Ask for feedback after each project.",
               "Prepare three stories about your work.", "Research the company before the interview.",
               "Set one clear goal for the quarter.", "Keep your resume to one page."],
}
GENERAL_SENTENCES = ["Go one step at a time.", "The simplest option is often the best one.",
                     "Plan the work before you start.", "Check the result at the end.",
                     "Small changes add up over time.", "Keep notes so you can repeat what works."]
OPENERS = {"formal": ["Here is a structured answer.", "The main points are as follows.",
                      "Please find the explanation below."],
           "casual": ["Hey, here's the deal!", "Okay so, it's pretty simple!", "Sure thing, let's go!"]}
CASUAL_TAGS = ["That's it, really!", "You'll be fine!", "It's kinda fun once you get going!"]
EXAMPLES = ["For example, try it first on a small case.", "For instance, a short list of three items works well.",
            "For example, one page is often enough."]
ENDINGS = {"question": ["Would you like more detail on any part?", "Shall I expand on one of these points?",
                        "Does this match what you need?"],
           "statement": ["That covers the essentials.", "This should be enough to begin.",
                         "These steps will get you there."]}
TARGET_WORDS = {"short": 22, "medium": 70, "long": 125}


def _sentences(topic: str, rng: random.Random, words: int) -> list[str]:
    pool = TOPIC_SENTENCES.get(topic, GENERAL_SENTENCES) + GENERAL_SENTENCES
    out, count = [], 0
    while count < words:
        s = rng.choice(pool)
        out.append(s)
        count += len(s.split())
    return out


def write_answer(topic: str, values: dict[str, str], rng: random.Random) -> str:
    """An answer on `topic` whose measured properties equal `values` (all five given)."""
    register, fmt = values["register"], values["format"]
    head = [rng.choice(OPENERS[register])]
    extras = ([rng.choice(EXAMPLES)] if values["example"] == "with_example" else [])
    extras += [rng.choice(CASUAL_TAGS)] if register == "casual" else []
    tail = rng.choice(ENDINGS[values["ending"]])
    fixed = sum(len(s.split()) for s in head + extras) + len(tail.split())
    body = _sentences(topic, rng, max(TARGET_WORDS[values["length"]] - fixed, 3))
    while len(body) < MIN_BULLETS:  # bullets need two points; prose keeps the same shape
        body += _sentences(topic, rng, 1)

    def compose() -> str:
        if fmt == "bullets":
            return "\n".join(head + [f"- {p}" for p in body + extras] + [tail])
        return " ".join(head + body + extras + [tail])

    # Trim or pad to the band (the pieces have uneven lengths); bounded, then checked.
    for _ in range(40):
        text = compose()
        band = measure(text)["length"]
        if band == values["length"]:
            break
        if TARGET_WORDS[band] < TARGET_WORDS[values["length"]]:
            body.extend(_sentences(topic, rng, 1))
        elif len(body) > MIN_BULLETS:
            body.pop()
        elif head:
            head = []  # a short answer with every extra has no room for an opener
        else:
            pool = TOPIC_SENTENCES.get(topic, []) + GENERAL_SENTENCES
            body = sorted(pool, key=lambda s: len(s.split()))[:MIN_BULLETS]
    got = measure(text)
    if got != values:
        raise AssertionError(f"synthetic answer has {got}, wanted {values}: {text!r}")
    return text


def all_value_combinations() -> list[dict[str, str]]:
    """Every combination of property values (3*2*2*2*2 = 48), in a fixed order."""
    combos: list[dict[str, str]] = [{}]
    for prop, values in PROPERTIES.items():
        combos = [c | {prop: v} for c in combos for v in values]
    return combos
