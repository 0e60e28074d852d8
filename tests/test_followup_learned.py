"""The `learned` follow-up backend: its artifact, what it was trained on, and how it labels."""
from __future__ import annotations

import json
import shutil

import pytest

from actors.followup_classifier import FollowupClassifier
from actors.followup_learned import ARTIFACT, FEATURES_VERSION, LearnedFollowupModel
from pipelines.tools.train_followups import development_data
from tests.conftest import DATA

POEM = "Whiskers soft and eyes of gold,\nCats are curious, sly and bold."
CASES = [("thanks, that's perfect!", "positive"),
         ("Make it shorter.", "reattempt_feedback"),
         ("It doesn't work, still too long", "complaint"),
         ("Now write a short story about a dog who learns to swim, for my son.", "new_request")]


@pytest.fixture(scope="module")
def learned() -> FollowupClassifier:
    return FollowupClassifier("learned")


def classify(classifier: FollowupClassifier, messages: list[str]):
    return classifier.classify_batch([[{"role": "user", "content": "Write a poem about cats"}]] * len(messages),
                                     [POEM] * len(messages), messages)


def test_the_committed_artifact_was_trained_on_the_current_development_labels_only():
    meta = json.loads((ARTIFACT / "meta.json").read_text())
    items, labels, groups, digest = development_data()
    assert meta["training_data_sha256"] == digest and meta["training_examples"] == len(items) == 1058
    test_part = {json.loads(line)["conversation_hash"] for line in
                 (DATA / "wildchat-more" / "split.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "test"}
    assert len(test_part) == 126 and not test_part & set(groups)
    assert meta["features_version"] == FEATURES_VERSION


def test_plain_followups_get_their_labels(learned):
    results = classify(learned, [message for message, _ in CASES])
    assert [r.label for r in results] == [label for _, label in CASES]
    assert {r.backend for r in results} == {"learned"}


def test_the_cascade_keeps_the_rules_confident_new_requests_without_asking_the_model():
    cascade = FollowupClassifier("cascade", cascade_model="learned")
    results = classify(cascade, [message for message, _ in CASES])
    assert [r.label for r in results] == [label for _, label in CASES]
    # The long new request is the rules' own confident call (0.8), never the model's.
    assert results[3].confidence == 0.8 and {r.backend for r in results} == {"cascade"}


def test_an_artifact_of_other_features_is_refused_with_what_to_do(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(ARTIFACT, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"features_version": FEATURES_VERSION - 1}))
    with pytest.raises(ValueError, match="retrain with `rlhi train-followups`"):
        LearnedFollowupModel(folder)
    with pytest.raises(FileNotFoundError, match="holds no learned follow-up model"):
        LearnedFollowupModel(tmp_path / "missing")
