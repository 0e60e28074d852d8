"""The follow-ups stage: which turns are follow-ups and what their rows hold (no Ray)."""
from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from pipelines.stages.followups import extract_followups
from pipelines.schema import CONVERSATIONS

T = datetime(2024, 1, 1, tzinfo=timezone.utc)


def conversations(*turn_lists, system=None) -> pa.Table:
    rows = []
    for i, texts in enumerate(turn_lists):
        turns = [{"role": "user" if j % 2 == 0 else "assistant", "content": text, "timestamp": None,
                  "turn_identifier": j} for j, text in enumerate(texts)]
        rows.append({"conversation_id": f"c{i}", "user_id": "u", "conversation_hash": f"h{i}", "timestamp": T,
                     "model": "m", "language": "English", "system": system, "turns": turns,
                     "n_user_turns": (len(texts) + 1) // 2, "n_chars": 0, "toxic": False,
                     "wildchat_redacted": False, "redactions": 0, "country": None, "state": None,
                     "hashed_ip": "u", "source_format": "wildchat", "source_file": "f", "source_index": i})
    return pa.Table.from_pylist(rows, schema=CONVERSATIONS)


def test_every_user_turn_after_an_assistant_turn_is_one_followup():
    table = extract_followups(conversations(["q1", "a1", "q2", "a2", "q3"], ["only a question"], ["q", "a"]))
    assert table.num_rows == 2
    assert table.column("turn_index").to_pylist() == [2, 4]


def test_a_followup_row_holds_the_context_the_answer_and_the_message():
    row = extract_followups(conversations(["q1", "a1", "q2", "a2", "q3"])).to_pylist()[1]
    assert row["context"] == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                              {"role": "user", "content": "q2"}]
    assert row["answer"] == "a2" and row["message"] == "q3"
    assert row["timestamp"] == T  # the turn has no time of its own: its conversation's


def test_a_system_message_opens_the_context():
    row = extract_followups(conversations(["q1", "a1", "q2"], system="Be brief.")).to_pylist()[0]
    assert row["context"][0] == {"role": "system", "content": "Be brief."}


def test_followup_ids_are_stable_and_unique():
    a = extract_followups(conversations(["q1", "a1", "q2", "a2", "q3"]))
    b = extract_followups(conversations(["q1", "a1", "q2", "a2", "q3"]))
    assert a.column("followup_id").equals(b.column("followup_id"))
    assert len(set(a.column("followup_id").to_pylist())) == a.num_rows


def test_the_stage_labels_with_the_learned_backend_and_names_its_artifact_in_the_manifest():
    import json

    from actors.followup_classifier import FollowupClassifier
    from actors.followup_learned import ARTIFACT
    from pipelines.config import parse_config
    from pipelines.stages.followups import classifier_models, label

    table = label(FollowupClassifier("learned"),
                  conversations(["Write a poem about cats", "Cats are soft.", "Make it shorter.", "Short: cats.",
                                 "thanks, that's perfect!"]), batch_size=8)
    assert table.column("label").to_pylist() == ["reattempt_feedback", "positive"]
    assert set(table.column("backend").to_pylist()) == {"learned"}
    meta = json.loads((ARTIFACT / "meta.json").read_text())
    config = parse_config({"followups": {"backend": "cascade", "cascade_model": "learned"}})
    assert classifier_models(config) == [{"id": str(ARTIFACT), "kind": "learned-followups",
                                          "training_data_sha256": meta["training_data_sha256"]}]
    assert classifier_models(parse_config({"followups": {"backend": "rules"}})) == []


def test_an_llm_classifier_on_vllm_gets_a_gpu_per_actor():
    from pipelines.config import parse_config
    from pipelines.stages.followups import classifier_gpus, classifier_models

    def config(**followups):
        return parse_config({"run_dir": "/tmp/x", "followups": followups,
                             "models": {"classifier": {"id": "meta-llama/Llama-3.1-8B-Instruct", "engine": "vllm"}}})

    assert classifier_gpus(config(backend="cascade")) == 1.0          # the paper config
    assert classifier_gpus(config(backend="llm")) == 1.0
    assert classifier_gpus(config(backend="rules")) == 0.0
    assert classifier_gpus(config(backend="cascade", cascade_model="learned")) == 0.0
    # cascade_model matters only to cascade: an llm backend records the LLM it ran.
    assert [m["id"] for m in classifier_models(config(backend="llm", cascade_model="learned"))] == [
        "meta-llama/Llama-3.1-8B-Instruct"]
