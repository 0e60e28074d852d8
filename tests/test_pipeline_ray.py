"""Follow-ups and personas on the session's end-to-end run of the bundled sample."""
from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq

from pipelines.persona_join import join_personas
from pipelines.schema import FOLLOWUPS, PERSONAS, USERS


def tables(run_dir):
    return (pq.read_table(run_dir / "ingest" / "conversations"), pq.read_table(run_dir / "followups" / "followups"),
            pq.read_table(run_dir / "personas" / "personas"), pq.read_table(run_dir / "personas" / "users"))


def test_every_followup_of_the_kept_conversations_is_labelled(pipeline_run):
    run_dir, summaries = pipeline_run
    conversations, followups, _, _ = tables(run_dir)
    # Turns alternate from the user: user turns 2, 4, ... each follow an answer.
    expected = sum((len(turns) - 1) // 2 for turns in conversations.column("turns").to_pylist())
    assert followups.schema.equals(FOLLOWUPS) and followups.num_rows == expected
    assert followups.column("label").null_count == 0
    assert set(followups.column("backend").to_pylist()) == {"rules"}
    assert summaries["followups"]["labels"]["reattempt_feedback"] > 0


def test_every_turn_sees_a_persona_built_only_from_earlier_conversations(pipeline_run):
    run_dir, _ = pipeline_run
    conversations, followups, personas, _ = tables(run_dir)
    links = pq.read_table(run_dir / "personas" / "conversation_personas")
    assert sorted(links.column("conversation_id").to_pylist()) == sorted(conversations.column("conversation_id").to_pylist())
    snapshot = personas.to_pandas().set_index("persona_id")
    for link in links.to_pylist():
        assert not snapshot.loc[link["persona_id"], "serving"]
        assert snapshot.loc[link["persona_id"], "conversations_before"] <= link["conversation_index"]
    joined = join_personas(followups.select(["conversation_id"]).to_pandas(), links)
    assert joined.notna().all()


def test_users_without_history_get_an_explicit_empty_persona(pipeline_run):
    run_dir, summaries = pipeline_run
    conversations, _, personas, _ = tables(run_dir)
    rows = personas.to_pandas()
    assert personas.schema.equals(PERSONAS)
    firsts = rows[(~rows["serving"]) & (rows["history_conversations"] == 0)]
    assert set(firsts["user_id"]) == set(conversations.column("user_id").to_pylist())
    assert (firsts["persona"] == "").all() and summaries["personas"]["empty_personas"] == 12


def test_each_user_has_one_serving_persona_from_all_history(pipeline_run):
    run_dir, _ = pipeline_run
    _, _, personas, _ = tables(run_dir)
    serving = personas.to_pandas().query("serving")
    assert serving["user_id"].is_unique and len(serving) == 12
    assert (serving["persona"].str.len() > 0).all()


def test_the_evaluation_split_holds_users_with_history(pipeline_run):
    run_dir, summaries = pipeline_run
    _, _, _, users = tables(run_dir)
    frame = users.to_pandas()
    assert users.schema.equals(USERS) and frame["user_id"].is_unique
    assert len(frame.query("split == 'eval' and has_history")) >= 2
    assert set(frame["split"]) == {"train", "eval"}


def test_personas_never_carry_identifiers(pipeline_run):
    run_dir, _ = pipeline_run
    _, _, personas, _ = tables(run_dir)
    text = "\n".join(personas.column("persona").to_pylist())
    assert "@" not in text and not pd.Series([text]).str.contains(r"\+?\d[\d\s-]{8,}\d").any()
