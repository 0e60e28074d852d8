"""Reading stated preferences by structure (actors/preference_reader.py).

One behaviour per test, then regression floors on the development material the reader was
written against (the dev phrasing family and the validation messages). The evaluation
family is never read here: the simulated-user experiment reports the reader on it.
"""
from __future__ import annotations

import random

import pytest

from actors.persona_extractive import message_preferences
from actors.preference_reader import read_preferences
from sim.feedback import feedback_message
from sim.phrasings import FOLDER, load_bank
from sim.profiles import PROPERTIES

# The simulator's property values in the persona's vocabulary.
VOCABULARY = {"short": ("length", "short"), "medium": ("length", "medium"), "long": ("length", "long"),
              "bullets": ("format", "structured"), "prose": ("format", "prose"),
              "formal": ("register", "formal"), "casual": ("register", "casual"),
              "with_example": ("examples", "yes"), "no_example": ("examples", "no"),
              "question": ("ending", "question"), "statement": ("ending", "statement")}


def read(text: str) -> dict[str, str]:
    return dict(read_preferences(text))


@pytest.mark.parametrize("text, expected", [
    ("no bullet points please", {"format": "prose"}),
    ("stop giving me examples every time", {"examples": "no"}),
    ("lose the slang", {"register": "formal"}),
    ("no slang or contractions", {"register": "formal"}),
    ("don't hold back on the detail", {"length": "long"}),           # two negations: a wish
    ("a one-liner isn't enough", {"length": "long"}),                  # a verdict after the mention
])
def test_negation_turns_the_value_it_governs(text, expected):
    assert read(text) == expected


def test_negation_does_not_reach_past_and():
    assert read("please make it less formal and in list form") == {"register": "casual", "format": "structured"}


@pytest.mark.parametrize("text, expected", [
    ("way too formal", {"register": "casual"}), ("too short", {"length": "long"}),
    ("too long", {"length": "short"}), ("not too long, not too short", {"length": "medium"})])
def test_too_turns_a_value_around(text, expected):
    assert read(text) == expected


def test_comparatives_keep_their_direction():
    assert read("shorter, and more casual") == {"length": "short", "register": "casual"}
    assert read("less stiff") == {"register": "casual"}


def test_complaint_words_hold_in_any_frame():
    assert read("this is wordy") == {"length": "short"}
    assert read("the bullets make it choppy") == {"format": "prose"}


def test_a_description_of_the_answer_is_not_a_wish():
    assert read("I wanted paragraphs, and instead this is a bulleted list") == {"format": "prose"}
    assert read("You gave me examples. I asked for none of them, no examples") == {"examples": "no"}


def test_a_definite_mention_without_a_wish_states_nothing():
    assert read("the example about dogs was wrong, fix the date") == {}


def test_a_pronoun_removal_turns_the_last_mention():
    assert read("The examples are confusing me. Take them out.") == {"examples": "no"}


@pytest.mark.parametrize("text, value", [
    ("under 30 words", "short"), ("at least 150 words", "long"), ("60-80 words", "medium"),
    ("between 50 and 90 words", "medium"), ("a page or two", "long"), ("one or two sentences", "short"),
    ("about a paragraph", "medium"), ("less than 100 words but more than a couple lines", "medium")])
def test_counts_read_against_the_length_bands(text, value):
    assert read(text) == {"length": value}


def test_a_bare_count_reads_against_the_answer_it_reacts_to():
    long_answer = " ".join(["word"] * 500)
    assert read_preferences("make it 200 words", long_answer) == [("length", "short")]
    assert read_preferences("make it 200 words") == [("length", "long")]


def test_content_words_state_nothing():
    assert read("tips to pack for a long flight") == {}
    assert read("give me a list of 100 streets in Kyiv") == {}
    assert read("the formal definition you gave is not my textbook's") == {}


def test_a_message_that_states_nothing_returns_nothing():
    assert read("that's wrong, the capital of Australia is Canberra") == {}
    assert read("try again") == {}


def test_other_languages_are_read_for_the_common_words():
    assert read("слишком длинно, короче") == {"length": "short"}
    assert read("请简短一点") == {"length": "short"}


def test_pasted_material_after_the_instruction_is_not_read():
    text = "Shorten this:\n" + "The list below gives a detailed, formal overview with examples. " * 10
    assert read(text) == {"length": "short"}


def test_message_preferences_adds_the_code_language():
    assert message_preferences("too long, and use python 3") == [("length", "short"), ("code", "python")]


# --- regression floors on the development material (not the evaluation family) --------

DEV_MESSAGES_EXACT_FLOOR = 0.97     # dev family's free-form messages
VAL_MESSAGES_EXACT_FLOOR = 0.95     # the validation messages (data/sim/phrasings-val.yaml)
DEV_TEMPLATED_EXACT_FLOOR = 0.95    # the simulator's own re-attempts and corrections, dev family


def exact_share(items) -> float:
    return sum(read(text) == {VOCABULARY[v][0]: VOCABULARY[v][1] for v in states.values()}
               for text, states in items) / len(items)


def test_dev_family_messages_regression_floor():
    assert exact_share(load_bank("dev").messages) >= DEV_MESSAGES_EXACT_FLOOR


def test_validation_messages_regression_floor():
    import yaml

    raw = yaml.safe_load((FOLDER / "phrasings-val.yaml").read_text())["messages"]
    assert exact_share([(m["text"], m["states"]) for m in raw]) >= VAL_MESSAGES_EXACT_FLOOR


def test_dev_family_simulated_feedback_regression_floor():
    bank, rng, items = load_bank("dev"), random.Random(0), []
    for _ in range(300):
        wanted = {p: rng.choice(PROPERTIES[p]) for p in rng.sample(sorted(PROPERTIES), 2)}
        got = {p: rng.choice([v for v in PROPERTIES[p] if v != w]) for p, w in wanted.items()}
        msg = feedback_message(rng.choice(("reattempt", "correction")), "How do I cook rice", wanted, got, rng, bank)
        items.append((msg.text, {p: wanted[p] for p in msg.named}))
    assert exact_share(items) >= DEV_TEMPLATED_EXACT_FLOOR
