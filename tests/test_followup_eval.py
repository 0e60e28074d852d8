"""Scoring a follow-up backend against gold labels (`rlhi eval-followups`)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.followup_rules import RulesClassifier
from pipelines.tools.followup_eval import (evaluate_backend, followup_examples, format_report,
                                     load_gold_labels, score)
from tests.conftest import FOLLOWUP_LABELS, WILDCHAT_SAMPLE


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_labels(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_feedback_precision_and_recall_count_the_three_feedback_labels_as_one():
    gold = ["correction", "complaint", "reattempt_feedback", "new_request", "new_request"]
    pred = ["reattempt_feedback", "new_request", "reattempt_feedback", "complaint", "new_request"]
    result = score(gold, pred)
    # 2 true positives, 1 false positive, 1 false negative.
    assert result["feedback_precision"] == pytest.approx(2 / 3)
    assert result["feedback_recall"] == pytest.approx(2 / 3)
    assert result["feedback_f1"] == pytest.approx(2 / 3)
    assert result["n"] == 5 and result["accuracy"] == pytest.approx(2 / 5)


def test_per_label_scores_and_macro_f1():
    gold = ["positive", "positive", "new_request", "new_request"]
    pred = ["positive", "new_request", "new_request", "new_request"]
    result = score(gold, pred)
    assert result["per_label"]["positive"] == {"precision": 1.0, "recall": 0.5,
                                               "f1": pytest.approx(2 / 3), "support": 2}
    assert result["per_label"]["new_request"]["precision"] == pytest.approx(2 / 3)
    # Macro over the labels that occur in gold or predictions, as scikit-learn averages.
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result["confusion"]["positive"] == {**{k: 0 for k in result["confusion"]["positive"]},
                                               "positive": 1, "new_request": 1}


def test_an_unclassified_prediction_counts_as_no_feedback_and_is_counted():
    result = score(["complaint", "new_request"], [None, "new_request"])
    assert result["unclassified"] == 1
    assert result["feedback_recall"] == 0.0
    assert result["confusion"]["complaint"]["unclassified"] == 1


def test_bootstrap_intervals_bracket_the_estimate_and_repeat_with_the_seed():
    gold = ["complaint", "new_request", "correction", "new_request"] * 10
    pred = ["complaint", "complaint", "new_request", "new_request"] * 10
    first, again = score(gold, pred, seed=3), score(gold, pred, seed=3)
    for key in ("feedback_precision", "feedback_recall", "feedback_f1", "macro_f1"):
        lo, hi = first[f"{key}_ci"]
        assert lo <= first[key] <= hi
        assert first[f"{key}_ci"] == again[f"{key}_ci"]


def test_score_rejects_mismatched_lengths_and_unknown_labels():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        score(["positive", "positive"], ["positive"])
    with pytest.raises(ValueError, match="unknown predicted label.*allowed: reattempt_feedback"):
        score(["positive"], ["praise"])


def test_followups_are_user_turns_right_after_an_assistant_turn():
    table = pa.table({"conversation_hash": ["h"], "conversation": [[
        msg("assistant", "Hi! How can I help?"), msg("user", "write a poem"),
        msg("assistant", "Roses..."), msg("assistant", "(continued)"), msg("user", "shorter"),
        msg("user", "please"), msg("assistant", "Roses."), msg("user", "thanks")]]})
    examples = followup_examples(table)
    assert [e["message_index"] for e in examples] == [1, 4, 7]
    assert examples[0]["previous_user"] is None
    assert examples[1] == {"conversation_hash": "h", "message_index": 4,
                           "previous_user": "write a poem", "answer": "(continued)",
                           "message": "shorter",   # and every turn before the answer, for a model
                           "context": [{"role": "assistant", "content": "Hi! How can I help?"},
                                       {"role": "user", "content": "write a poem"},
                                       {"role": "assistant", "content": "Roses..."}]}
    assert examples[2]["previous_user"] == "please"


def test_followups_are_read_from_a_runs_conversations_table_too():
    table = pa.table({"conversation_hash": ["h"], "turns": [[
        msg("user", "a"), msg("assistant", "b"), msg("user", "c")]]})
    assert [(e["message_index"], e["answer"]) for e in followup_examples(table)] == [(2, "b")]


@pytest.mark.parametrize("line, error", [
    ("{not json", r"labels.jsonl:2: not valid JSON"),
    ({"conversation_hash": "h", "label": "positive"}, r":2: missing field 'message_index'"),
    ({"conversation_hash": "h", "message_index": "3", "label": "positive"},
     r":2: field 'message_index' must be an integer"),
    ({"conversation_hash": "h", "message_index": 3, "label": "praise"},
     r":2: field 'label' has unknown label 'praise'; allowed: reattempt_feedback, correction"),
    ({"conversation_hash": "h", "message_index": 1, "label": "positive"},
     r":2: duplicate label for conversation_hash='h' message_index=1"),
])
def test_an_invalid_label_line_names_the_file_line_and_field(tmp_path, line, error):
    first = {"conversation_hash": "h", "message_index": 1, "label": "positive"}
    path = write_labels(tmp_path / "labels.jsonl", [first, line])
    with pytest.raises(ValueError, match=error):
        load_gold_labels(path)


def test_labels_need_only_hash_index_and_label(tmp_path):
    path = write_labels(tmp_path / "labels.jsonl", [
        {"conversation_hash": "h", "message_index": 2, "label": "complaint"}, "",
        {"conversation_hash": "h", "message_index": 4, "label": "new_request",
         "feedback": False, "rationale": "asks something else"}])
    assert load_gold_labels(path) == {("h", 2): "complaint", ("h", 4): "new_request"}


def conversations_file(tmp_path) -> str:
    path = tmp_path / "conversations.parquet"
    pq.write_table(pa.table({"conversation_hash": ["h"], "conversation": [[
        msg("user", "write a poem"), msg("assistant", "Roses..."), msg("user", "thanks!")]]}),
        path)
    return str(path)


def test_a_gold_label_without_a_matching_followup_is_an_error_naming_it(tmp_path):
    for key, why in [({"conversation_hash": "h", "message_index": 1}, "is not a user turn"),
                     ({"conversation_hash": "zz", "message_index": 2}, "has no conversation")]:
        labels = write_labels(tmp_path / "labels.jsonl", [{**key, "label": "positive"}])
        with pytest.raises(ValueError, match=f"conversation_hash='{key['conversation_hash']}' "
                                             f"message_index={key['message_index']} {why}"):
            evaluate_backend(conversations_file(tmp_path), labels, RulesClassifier().classify)


def test_a_runs_conversations_folder_is_read_whole(tmp_path):
    folder = tmp_path / "conversations"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"conversation_hash": [f"h{i}"], "turns": [[
            msg("user", "write a poem"), msg("assistant", "Roses..."), msg("user", "thanks!")]]}),
            folder / f"part-{i}.parquet")
    (tmp_path / "manifest.json").write_text("{}")
    labels = write_labels(tmp_path / "labels.jsonl", [
        {"conversation_hash": f"h{i}", "message_index": 2, "label": "positive"} for i in (0, 1)])
    result = evaluate_backend(tmp_path, labels, RulesClassifier().classify)
    assert result["n"] == 2 and result["per_label"]["positive"]["recall"] == 1.0


def test_a_backend_returning_the_wrong_number_of_results_is_an_error(tmp_path):
    labels = write_labels(tmp_path / "labels.jsonl",
                          [{"conversation_hash": "h", "message_index": 2, "label": "positive"}])
    with pytest.raises(ValueError, match="backend returned 0 results for 1 follow-ups"):
        evaluate_backend(conversations_file(tmp_path), labels, lambda items: [])


# Regression floor, not a measure of generalisation: the bundled labels are the ones the
# rules were written against (a development set). Held-out figures come from a test split.
BUNDLED_DEV_FEEDBACK_F1_FLOOR = 0.70
# The same on the development part of data/wildchat-more (measured 0.633 when written); its
# test part is never asserted on, only reported (README).
MORE_DEV_FEEDBACK_F1_FLOOR = 0.63
MORE = Path(__file__).resolve().parents[1] / "data" / "wildchat-more"


def test_rules_backend_keeps_its_regression_floor_on_the_bundled_development_labels():
    result = evaluate_backend(WILDCHAT_SAMPLE, FOLLOWUP_LABELS, RulesClassifier().classify)
    print("\n" + format_report(result))
    assert result["n"] == 156
    assert sum(m["support"] for m in result["per_label"].values()) == 156
    assert result["feedback_f1"] >= BUNDLED_DEV_FEEDBACK_F1_FLOOR


def test_rules_backend_keeps_its_regression_floor_on_the_development_part_of_wildchat_more():
    result = evaluate_backend(MORE / "train-00000-of-00001.parquet", MORE / "followup_labels.jsonl",
                              RulesClassifier().classify, split="dev")
    assert result["n"] == 902 and result["split"] == "dev"
    assert result["feedback_f1"] >= MORE_DEV_FEEDBACK_F1_FLOOR


def test_split_reads_only_that_splits_labels_and_needs_the_field(tmp_path):
    rows = [{"conversation_hash": "a", "message_index": 2, "label": "positive", "split": "dev"},
            {"conversation_hash": "b", "message_index": 2, "label": "complaint", "split": "test"}]
    labels = write_labels(tmp_path / "l.jsonl", rows)
    assert load_gold_labels(labels, "test") == {("b", 2): "complaint"}
    plain = write_labels(tmp_path / "p.jsonl", [{k: v for k, v in rows[0].items() if k != "split"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: no field 'split'"):
        load_gold_labels(plain, "dev")


def test_intervals_resample_conversations_not_followups():
    """Ten conversations, each all right or all wrong: the interval must be as wide as ten
    draws, not as a hundred independent follow-ups would make it."""
    gold = ["complaint"] * 100
    predicted = ["complaint" if i < 50 else "new_request" for i in range(100)]
    clusters = [f"c{i // 10}" for i in range(100)]
    by_conversation = score(gold, predicted, clusters=clusters, n_boot=500)
    by_followup = score(gold, predicted, n_boot=500)
    assert by_conversation["feedback_recall"] == by_followup["feedback_recall"] == 0.5
    width = lambda r: r["feedback_recall_ci"][1] - r["feedback_recall_ci"][0]  # noqa: E731
    assert width(by_conversation) > 2 * width(by_followup)
    assert by_conversation["conversations"] == 10
