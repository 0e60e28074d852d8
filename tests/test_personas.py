"""Persona snapshots, the user split and the persona join, as plain functions (no Ray)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pytest

from actors.persona_extractive import extractive_persona, stated_preferences
from pipelines.persona_join import join_personas
from pipelines.schema import CONVERSATION_PERSONAS
from pipelines.stages.personas import BEGINNING, conversation_snapshots, split_users, user_snapshots

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def conversation(i: int, text: str, user: str = "u1", toxic: bool = False) -> dict:
    return {"conversation_id": f"c{i}", "user_id": user, "timestamp": T0 + timedelta(days=i),
            "language": "English", "toxic": toxic,
            "turns": [{"role": "user", "content": text}, {"role": "assistant", "content": "answer"}]}


def snapshots(conversations, feedback=None, cadence=1, max_conversations=20, max_tokens=2000):
    histories_seen = []

    def build(histories):
        histories_seen.extend(histories)
        return [" | ".join(t["turns"][0]["content"] for t in h) for h in histories]

    rows = user_snapshots(conversations, feedback or {}, cadence=cadence, max_conversations=max_conversations,
                          max_tokens=max_tokens, backend="test", build=build, redact=lambda texts: [(t, {}) for t in texts])
    return rows, histories_seen


def test_every_user_gets_an_empty_first_snapshot_and_one_serving_persona():
    rows, _ = snapshots([conversation(0, "first"), conversation(1, "second")])
    assert rows[0]["as_of"] == BEGINNING and rows[0]["persona"] == "" and rows[0]["history_conversations"] == 0
    serving = [r for r in rows if r["serving"]]
    assert len(serving) == 1 and serving[0]["persona"] == "second | first"


def test_snapshot_k_holds_only_the_users_first_k_conversations_and_dates_after_them():
    convs = [conversation(i, f"request {i}") for i in range(4)]
    rows, _ = snapshots(convs)
    for row in rows:
        if row["serving"]:
            continue
        k = row["conversations_before"]
        assert row["persona"] == " | ".join(f"request {i}" for i in reversed(range(k)))
        assert row["history_conversations"] == k
        assert k == 0 or row["as_of"] > convs[k - 1]["timestamp"]


def test_cadence_sets_how_often_snapshots_are_taken():
    rows, _ = snapshots([conversation(i, f"r{i}") for i in range(6)], cadence=3)
    assert [r["history_conversations"] for r in rows if not r["serving"]] == [0, 3, 6]


def test_the_history_budget_keeps_the_most_recent_conversations():
    rows, _ = snapshots([conversation(i, f"r{i}") for i in range(5)], max_conversations=2)
    assert rows[-1]["persona"] == "r4 | r3"


def test_toxic_conversations_never_enter_a_persona():
    rows, _ = snapshots([conversation(0, "clean"), conversation(1, "nasty", toxic=True)])
    assert all("nasty" not in r["persona"] for r in rows)


def timed_conversation(i: int, convention: str) -> dict:
    """Conversation i: a request and feedback naming it, four turns a minute apart, starting
    an hour after the previous; its timestamp is its first turn's ("first") or its last's."""
    start = T0 + timedelta(hours=i)
    texts = [f"request {i}", "answer", f"feedback {i}: too long", "answer again"]
    turns = [{"role": r, "content": t, "timestamp": start + timedelta(minutes=m)}
             for m, (r, t) in enumerate(zip(["user", "assistant"] * 2, texts))]
    return {"conversation_id": f"c{i}", "user_id": "u1", "language": "English", "toxic": False, "turns": turns,
            "timestamp": turns[0]["timestamp"] if convention == "first" else turns[-1]["timestamp"]}


@pytest.mark.parametrize("convention", ["first", "last"])
def test_a_conversations_turns_see_a_persona_of_earlier_conversations_only(convention):
    """A follow-up's persona never states that follow-up (the leak that inflated the sim):
    whether a conversation is stamped with its first or its last turn, conversation i sees
    the snapshot of conversations 0..i-1 and nothing of its own."""
    convs = [timed_conversation(i, convention) for i in range(3)]
    feedback = {c["conversation_id"]: [c["turns"][2]["content"]] for c in convs}

    def build(histories):
        return [" | ".join(f for h in history for f in h["feedback"]) for history in histories]

    rows = user_snapshots(convs, feedback, cadence=1, max_conversations=20, max_tokens=2000, backend="test",
                          build=build, redact=lambda texts: [(t, {}) for t in texts])
    links = conversation_snapshots(convs, rows, cadence=1)
    persona = {r["persona_id"]: r for r in rows}
    seen = {link["conversation_id"]: persona[link["persona_id"]] for link in links}
    assert [seen[f"c{i}"]["persona"] for i in range(3)] == ["", "feedback 0: too long",
                                                             "feedback 1: too long | feedback 0: too long"]
    assert all(seen[f"c{i}"]["conversations_before"] == i and not seen[f"c{i}"]["serving"] for i in range(3))
    assert [link["conversation_index"] for link in links] == [0, 1, 2]


def test_two_conversations_at_once_never_see_each_others_later_turns():
    """The chat app's log stamps a conversation with its last turn: A (turns at 0:01 and
    1:40) continued past B's start (0:50). Ordered by when they began, A comes first and sees
    nothing; B began while A went on, so it does not see A (A's snapshot holds a turn from
    after B began) but the one before; C, after both, sees both."""
    def conv(cid: str, minutes: list[int]) -> dict:
        turns = [{"role": r, "content": f"{cid} {r} {m}", "timestamp": T0 + timedelta(minutes=m)}
                 for m, r in zip(minutes, ["user", "assistant"] * len(minutes))]
        return {"conversation_id": cid, "user_id": "u1", "language": "English", "toxic": False,
                "turns": turns, "timestamp": turns[-1]["timestamp"]}

    convs = [conv("A", [1, 2, 100, 101]), conv("B", [50, 51]), conv("C", [200, 201])]

    def build(histories):
        return [" | ".join(h["turns"][0]["content"] for h in history) for history in histories]

    rows = user_snapshots(convs, {}, cadence=1, max_conversations=20, max_tokens=2000, backend="test",
                          build=build, redact=lambda texts: [(t, {}) for t in texts])
    persona = {r["persona_id"]: r["persona"] for r in rows}
    seen = {link["conversation_id"]: persona[link["persona_id"]]
            for link in conversation_snapshots(convs, rows, cadence=1)}
    assert seen == {"A": "", "B": "", "C": "B user 50 | A user 1"}


def test_the_join_gives_each_row_its_conversations_persona():
    links = pa.Table.from_pylist([{"conversation_id": "c0", "user_id": "u1", "persona_id": "p-empty",
                                   "conversation_index": 0},
                                  {"conversation_id": "c1", "user_id": "u1", "persona_id": "p-one",
                                   "conversation_index": 1}], schema=CONVERSATION_PERSONAS)
    rows = pd.DataFrame({"conversation_id": ["c1", "c0", "c1", "unknown"]})
    assert join_personas(rows, links).tolist()[:3] == ["p-one", "p-empty", "p-one"]
    assert join_personas(rows, links).isna().tolist() == [False, False, False, True]


def test_the_split_is_deterministic_and_guarantees_eval_users_with_history():
    counts = {f"user{i}": (1 if i % 2 else 5) for i in range(20)}
    a = split_users(counts, eval_fraction=0.05, min_eval_with_history=3, seed=0)
    b = split_users(counts, eval_fraction=0.05, min_eval_with_history=3, seed=0)
    assert a.equals(b)
    rows = a.to_pylist()
    assert sum(1 for r in rows if r["split"] == "eval" and r["has_history"]) >= 3
    assert {r["split"] for r in rows} == {"train", "eval"}


def test_the_extractive_persona_reports_tasks_topics_and_stated_preferences():
    history = [{"language": "English", "feedback": ["too long, make it shorter please"],
                "turns": [{"role": "user", "content": "Write a python function to parse CSV files"}]},
               {"language": "English", "feedback": [],
                "turns": [{"role": "user", "content": "Fix this python error in my pandas script"}]}]
    persona = extractive_persona(history)
    assert "coding (2)" in persona and "python" in persona
    assert "prefers shorter answers" in persona
    assert extractive_persona([]) == ""


def test_stated_preferences_read_several_languages():
    assert stated_preferences(["Answer in French please"]) == ["wants answers in French"]
    assert stated_preferences(["слишком длинно, короче"]) == ["prefers shorter answers"]


def test_stated_preferences_read_negation_and_what_the_answer_was():
    assert stated_preferences(["no need for examples"]) == ["does not want examples"]
    assert stated_preferences(["don't use bullet points"]) == ["prefers plain paragraphs over lists"]
    assert stated_preferences(["This has no examples; I need an example."]) == ["asks for examples"]
    assert stated_preferences(["Hmm, I was after bullet points, and this is paragraphs."]) == [
        "likes structured answers (lists, tables, steps)"]
    assert stated_preferences(["and don't end on a question"]) == [
        "does not want answers to end with a question"]
    assert stated_preferences(["not too long and not too short"]) == ["prefers medium-length answers"]


def test_stated_preferences_keep_one_value_per_dimension():
    # Named most often wins; on a tie the latest statement wins.
    assert stated_preferences(["as bullet points please", "no lists", "without bullets"]) == [
        "prefers plain paragraphs over lists"]
    assert stated_preferences(["no lists", "bullets please"]) == [
        "likes structured answers (lists, tables, steps)"]
    both = stated_preferences(["shorter please", "more formal", "shorter!"])
    assert both == ["prefers shorter answers", "wants a formal tone"]


def test_feedback_turns_state_preferences_but_are_not_topics():
    history = [{"language": "English", "feedback": ["Skip the examples please"],
                "turns": [{"role": "user", "content": "Explain photosynthesis to me"},
                          {"role": "assistant", "content": "Plants use light."},
                          {"role": "user", "content": "Skip the examples please"}]}]
    persona = extractive_persona(history)
    assert persona.splitlines()[0] == "Stated preferences: does not want examples"
    assert "skip" not in persona.lower().split("topics:")[1]


def test_topics_leave_out_names_addresses_and_links():
    requests = ["Hi, my name is Martha Jones. Write a letter about my garden to Dr. Okafor",
                "Reach me at martha.jones@example.com or @mjones, or on https://marthas.blog/garden, "
                "or ask <PRESIDIO_ANONYMIZED_PERSON> about <PRESIDIO_ANONYMIZED_PERSON>",
                "Garden tips? Python script to water the garden, in python please",
                "A Garden poem for Okafor, about the garden"]
    history = [{"language": "English", "feedback": [],
                "turns": [{"role": "user", "content": text}, {"role": "assistant", "content": "Sure."}]}
               for text in requests]
    topics = extractive_persona(history).split("Topics: ")[1].splitlines()[0]
    # 'garden' and 'python' are also written in lower case; the names and the addresses never are.
    assert topics == "garden, python, name, letter, ask, tips"


def test_every_persona_is_redacted_and_its_redactions_counted():
    from pipelines.redact import Redactor

    def build(histories):   # a builder that copies an identifier from the history into the persona
        return [f"Writes from jane.doe@example.co.uk; {len(h)} conversations" for h in histories]

    rows = user_snapshots([conversation(0, "first"), conversation(1, "second")], {}, cadence=1, max_conversations=20,
                          max_tokens=2000, backend="test", build=build, redact=Redactor().redact_many)
    built = [r for r in rows if r["history_conversations"]]
    assert [(r["persona"], r["redactions"]) for r in built] == [
        ("Writes from <REDACTED_EMAIL>; 1 conversations", 1), ("Writes from <REDACTED_EMAIL>; 2 conversations", 1),
        ("Writes from <REDACTED_EMAIL>; 2 conversations", 1)]
    assert rows[0]["persona"] == "" and rows[0]["redactions"] == 0
