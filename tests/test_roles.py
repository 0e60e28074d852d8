"""Roles on tiny models: each one's output shape, both batch formats, a Ray Data actor pool."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.followup_classifier import FollowupClassifier
from actors.judge import Judge
from actors.models import ModelSpec
from actors.persona_builder import PersonaBuilder
from actors.policy_sampler import PolicySampler
from actors.reward_model import RewardModel, init_trained_reward_model
from actors.prompts import render
from actors.rewriter import FROM_SCRATCH_REQUEST, Rewriter, rewrite_messages
from pipelines.schema import FOLLOWUP_LABELS

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PERSONA = "Geography teacher; likes one-line answers."


@pytest.fixture(scope="module")
def spec(tiny_models):
    return ModelSpec(id=str(tiny_models.causal_lm), max_new_tokens=8, batch_size=4)


def test_policy_sampler_draws_n_candidates_with_paper_defaults(spec, tiny_engine):
    sampler = PolicySampler(spec, n=3, engine=tiny_engine)
    assert (sampler.params.temperature, sampler.params.top_p) == (0.6, 0.9)
    out = sampler.sample(PERSONA, QUESTION)
    assert len(out.candidates) == 3 and all(isinstance(c, str) for c in out.candidates)
    assert out.prompt[0]["role"] == "system" and PERSONA in out.prompt[0]["content"]
    assert out.prompt[1:] == QUESTION and out.context_truncated == 0


def test_policy_sampler_refuses_a_context_that_does_not_end_with_a_user_turn(spec, tiny_engine):
    with pytest.raises(ValueError, match="end with"):
        PolicySampler(spec, engine=tiny_engine).sample(None, QUESTION + [
            {"role": "assistant", "content": "Paris"}])


def test_rewriter_returns_one_revised_answer_per_input(spec, tiny_engine):
    out = Rewriter(spec, engine=tiny_engine).rewrite_batch(
        [PERSONA, None], [QUESTION, QUESTION], ["Lyon", "Not sure"], ["Wrong.", "Be exact."])
    assert len(out) == 2 and all(isinstance(r.text, str) for r in out)
    assert {r.finish_reason for r in out} <= {"stop", "length"}


def test_rewriter_chat_layout_asks_for_the_next_turn_after_the_follow_up(spec, tiny_engine):
    role, turns, fields = rewrite_messages("chat", PERSONA, QUESTION, "Lyon", "Wrong.")
    messages = render(role, PERSONA, turns, **fields)
    assert messages[1:] == [*QUESTION, {"role": "assistant", "content": "Lyon"},
                            {"role": "user", "content": "Wrong."}]
    assert PERSONA in messages[0]["content"] and "<answer>" not in str(messages)
    role, turns, fields = rewrite_messages("chat", PERSONA, QUESTION, "Lyon", None)  # from scratch
    scratch = render(role, PERSONA, turns, **fields)
    assert scratch[-1] == {"role": "user", "content": FROM_SCRATCH_REQUEST}
    assert scratch[0]["content"] != messages[0]["content"]  # its task says so
    chat = Rewriter(spec.model_copy(update={"rewrite_prompt": "chat"}), engine=tiny_engine)
    out = chat.rewrite_batch([PERSONA, None], [QUESTION, QUESTION], ["Lyon", "Lyon"], ["Wrong.", None])
    assert len(out) == 2 and {r.finish_reason for r in out} <= {"stop", "length"}


def test_followup_classifier_gives_a_known_label_and_its_probability(spec, tiny_engine):
    classifier = FollowupClassifier("llm", spec, engine=tiny_engine)
    result = classifier.classify(QUESTION, "Lyon.", "No, that's wrong.")
    probs = classifier.label_probabilities(QUESTION, "Lyon.", "No, that's wrong.")
    assert result.label in FOLLOWUP_LABELS and result.backend == "llm"
    assert set(probs) == set(FOLLOWUP_LABELS) and sum(probs.values()) == pytest.approx(1.0)
    assert result.confidence == pytest.approx(max(probs.values()))


def test_the_rules_backend_needs_no_model():
    result = FollowupClassifier("rules").classify(
        [{"role": "user", "content": "Write a poem about the sea"}], "The sea is blue.",
        "make it longer, at least 20 lines")
    assert result == result.__class__("reattempt_feedback", result.confidence, "rules")


class CountingEngine:
    """Wraps an engine and counts the prompts the model is asked to score."""

    def __init__(self, engine):
        self.engine, self.scored = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_continuations(self, prompts, continuations):
        self.scored += len(prompts)
        return self.engine.score_continuations(prompts, continuations)


def test_the_cascade_asks_the_model_only_about_what_the_rules_flag(spec, tiny_engine):
    engine = CountingEngine(tiny_engine)
    classifier = FollowupClassifier("cascade", spec, engine=engine)
    request = [{"role": "user", "content": "Write a poem about the sea"}]
    long_new_request = ("Now please explain in detail how photosynthesis works in desert plants, "
                        "including the CAM pathway and why it saves water.")
    out = classifier.classify_batch([request, request], ["The sea is blue.", "The sea is blue."],
                                    ["No, that's wrong, the sea is green.", long_new_request])
    assert engine.scored == 1
    assert out[1].label == "new_request" and {r.backend for r in out} == {"cascade"}
    assert out[0].label in FOLLOWUP_LABELS


class BrokenScores:
    """A scripted engine that returns an unusable score for every label."""

    max_context_tokens = 2048

    def count_tokens(self, messages):
        return sum(len(m["content"]) // 4 + 1 for m in messages)

    def score_continuations(self, prompts, continuations):
        return [[float("nan")] * len(c) for c in continuations]


def test_an_unusable_model_result_is_recorded_as_unclassified_never_guessed(spec):
    classifier = FollowupClassifier("llm", spec, engine=BrokenScores())
    result = classifier.classify(QUESTION, "Lyon.", "No, that's wrong.")
    assert result.label is None and result.unclassified_reason.startswith("scores: unusable")


def test_the_extractive_persona_builder_summarises_history_deterministically():
    history = [{"language": "English", "feedback": ["shorter please"],
                "turns": [{"role": "user", "content": "Write python code to sort a list"},
                          {"role": "assistant", "content": "sorted(xs)"}]}]
    builder = PersonaBuilder("extractive")
    persona = builder.build(history)
    assert persona == builder.build(history) and "coding (1)" in persona
    assert "prefers shorter answers" in persona
    assert builder.build([]) == ""


def test_the_llm_persona_builder_writes_a_bounded_summary(spec, tiny_engine):
    history = [{"language": "English", "feedback": [],
                "turns": [{"role": "user", "content": "Explain black holes simply"}]}]
    builder = PersonaBuilder("llm", spec, engine=tiny_engine, max_persona_chars=40)
    out = builder.build_batch([history, []])
    assert isinstance(out[0], str) and len(out[0]) <= 40 and out[1] == ""


@pytest.mark.parametrize("backend", ["judge", "classifier", "trained"])
def test_reward_model_scores_every_candidate(backend, tiny_models, tiny_engine):
    model = {"judge": tiny_models.causal_lm, "classifier": tiny_models.reward_model,
             "trained": tiny_models.encoder_reward}[backend]
    engine = tiny_engine if backend == "judge" else None
    rm = RewardModel(backend, ModelSpec(id=str(model)), engine=engine)
    scores = rm.score_batch([PERSONA, ""], [QUESTION, QUESTION],
                            [["Paris.", "Lyon.", "Rome."], ["Paris."]])
    assert [len(s) for s in scores] == [3, 1]
    assert all(isinstance(x, float) and np.isfinite(x) for s in scores for x in s)
    if backend == "judge":
        assert all(0.0 <= x <= 1.0 for s in scores for x in s)


def test_reward_classifier_batched_equals_one_by_one(tiny_models):
    rm = RewardModel("classifier", ModelSpec(id=str(tiny_models.reward_model), batch_size=4))
    candidates = ["Paris.", "It is Paris, a city of two million people.", "Lyon"]
    batched = rm.score(PERSONA, QUESTION, candidates)
    single = [rm.score(PERSONA, QUESTION, [c])[0] for c in candidates]
    assert batched == pytest.approx(single, abs=1e-5)


def test_the_scorer_groups_rows_by_length_within_its_token_and_row_limits(tiny_models):
    from actors.engines.reward_scorer import SequenceRewardScorer

    scorer = SequenceRewardScorer(ModelSpec(id=str(tiny_models.encoder_reward), batch_size=3),
                                  max_bucket_tokens=40)
    # Sorted: 3, 4, 5 (a full bucket of 3 rows), 10, 12 (2 x 12 <= 40), 30 (2 x 30 > 40).
    assert scorer.buckets([10, 3, 12, 4, 30, 5]) == [[1, 3, 5], [0, 2], [4]]
    assert scorer.buckets([100]) == [[0]]  # a row over the budget still goes, alone


def test_trained_scores_in_length_buckets_equal_scores_one_by_one_in_order(tiny_models):
    from actors.engines.reward_scorer import SequenceRewardScorer

    spec = ModelSpec(id=str(tiny_models.encoder_reward), batch_size=8)
    rm = RewardModel("trained", spec, scorer=SequenceRewardScorer(spec, max_bucket_tokens=120))
    candidates = ["A long answer: " + "the capital is Paris " * 6, "Paris.", "Lyon",
                  "It is Paris, a city of two million people.", "Rome " * 9]
    rows = rm.encode(PERSONA, QUESTION, candidates)
    assert len(rm.scorer.buckets([len(r["input_ids"]) for r in rows])) > 1
    single = [rm.score(PERSONA, QUESTION, [c])[0] for c in candidates]
    assert rm.score(PERSONA, QUESTION, candidates) == pytest.approx(single, abs=1e-5)
    assert rm.score_encoded(rows) == pytest.approx(single, abs=1e-5)
    assert len(set(single)) == len(single)  # distinct, so an order mix-up would show


def test_reward_model_sees_the_persona(tiny_models):
    rm = RewardModel("classifier", ModelSpec(id=str(tiny_models.reward_model)))
    assert rm.score(PERSONA, QUESTION, ["Paris."]) != rm.score(None, QUESTION, ["Paris."])


def test_a_saved_trained_reward_model_loads_and_scores(tiny_models, tmp_path):
    model, tokenizer = init_trained_reward_model(str(tiny_models.encoder_reward))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    rm = RewardModel("trained", str(tmp_path / "rm"))
    assert len(rm.score(PERSONA, QUESTION, ["Paris.", "Lyon."])) == 2


def test_reward_backends_other_than_judge_need_a_model():
    with pytest.raises(ValueError, match="needs a model"):
        RewardModel("trained")


def test_judge_asks_both_orders_and_is_symmetric(spec, tiny_engine):
    judge = Judge(spec, engine=tiny_engine, reason_tokens=6)
    ab = judge.compare(PERSONA, QUESTION, "Paris.", "Lyon, probably.")
    ba = judge.compare(PERSONA, QUESTION, "Lyon, probably.", "Paris.")
    assert ab.winner in ("a", "b", "tie") and isinstance(ab.reason, str)
    assert ab.prob_a == pytest.approx(1 - ba.prob_a, abs=1e-6)
    assert {ab.winner, ba.winner} in ({"tie"}, {"a", "b"})


# ---------------------------------------------------------------- batch formats

def _rows():
    return {"persona": [PERSONA, ""], "context": [QUESTION, QUESTION],
            "candidates": [["Paris.", "Lyon."], ["Rome."]]}


def test_a_role_accepts_an_arrow_batch_and_returns_one(tiny_engine):
    rm = RewardModel("judge", engine=tiny_engine)
    out = rm(pa.Table.from_pydict(_rows()))
    assert isinstance(out, pa.Table) and out.column_names[-1] == "scores"
    assert [len(s) for s in out.column("scores").to_pylist()] == [2, 1]


def test_a_role_accepts_a_numpy_batch_and_returns_one(tiny_engine):
    table = pa.Table.from_pydict(_rows())
    # What Ray Data hands over for batch_format="numpy": nested object arrays.
    batch = {name: table.column(name).to_numpy(zero_copy_only=False)
             for name in table.column_names}
    out = RewardModel("judge", engine=tiny_engine)(batch)
    assert out["scores"].dtype == object and [len(s) for s in out["scores"]] == [2, 1]


def test_a_batch_without_a_needed_column_names_it(tiny_engine):
    with pytest.raises(KeyError, match="candidates"):
        RewardModel("judge", engine=tiny_engine)({"persona": np.array([""])})


# ---------------------------------------------------------------- Ray Data actor pool

@pytest.mark.timeout(180)
def test_roles_run_inside_a_ray_data_actor_pool(ray_session, tiny_models):
    import ray

    spec = ModelSpec(id=str(tiny_models.causal_lm), max_new_tokens=6).model_dump()
    rows = [{"persona": PERSONA if i % 2 else "", "context": QUESTION} for i in range(6)]
    # Two blocks from the start: a repartition task would need a CPU the pools hold.
    ds = ray.data.from_items(rows, override_num_blocks=2)
    ds = ds.map_batches(PolicySampler, fn_constructor_kwargs={"model": spec, "n": 2},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=3,
                        batch_format="pyarrow", num_cpus=0.5)  # 2 CPUs: room for both pools
    ds = ds.map_batches(RewardModel, fn_constructor_kwargs={"backend": "judge", "model": spec},
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=3,
                        batch_format="numpy", num_cpus=0.5)
    out = ds.take_all()
    assert len(out) == 6
    assert all(len(r["candidates"]) == 2 and len(r["scores"]) == 2 for r in out)
    assert all(r["prompt"][0]["role"] == "system" for r in out)
