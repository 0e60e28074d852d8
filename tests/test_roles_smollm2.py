"""The embedded default model, SmolLM2-135M-Instruct from the wheel, through the roles.

Slow (about 20 s): a real 135M model on CPU. Skipped when `make models` has not run.
"""
from __future__ import annotations

import pytest

from actors.engines import make_engine
from actors.judge import Judge
from actors.models import ModelSpec
from actors.policy_sampler import PolicySampler
from actors.reward_model import RewardModel
from actors.rewriter import Rewriter

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(smollm2_spec):
    return make_engine(smollm2_spec)


def test_policy_sampler_answers_paris_greedily(smollm2_spec, engine):
    answer = PolicySampler(smollm2_spec, n=1, engine=engine).sample(None, FRANCE)
    assert "paris" in answer.candidates[0].lower()


def test_policy_sampler_answers_paris_at_the_paper_temperature(smollm2_spec, engine):
    spec = smollm2_spec.model_copy(update={"temperature": None, "max_new_tokens": 24})
    sampler = PolicySampler(spec, n=4, engine=engine)
    candidates = sampler.sample("Geography teacher.", FRANCE).candidates
    assert sum("paris" in c.lower() for c in candidates) >= 3, candidates


def test_rewriter_answers_paris_when_told_the_answer_fell_short(smollm2_spec, engine):
    rewrite = Rewriter(smollm2_spec, engine=engine).rewrite(
        None, FRANCE, "I am not sure.", "That is not an answer. Name the city.")
    assert "paris" in rewrite.text.lower(), rewrite


def test_judge_reason_names_paris(smollm2_spec, engine):
    verdict = Judge(smollm2_spec, engine=engine).compare(
        None, FRANCE, "The capital of France is Paris.", "The capital of France is Rome.")
    assert "paris" in verdict.reason.lower(), verdict


def test_reward_judge_scores_the_right_answer_highest(engine):
    scores = RewardModel("judge", engine=engine).score(
        None, FRANCE, ["The capital of France is Paris.", "The capital of France is Rome."])
    assert scores[0] > scores[1]


def test_smollm2_loads_through_the_plain_from_pretrained_path(smollm2_spec):
    from transformers import AutoModelForCausalLM

    from actors.models import load_model, resolve_model

    folder = resolve_model(smollm2_spec.id)
    model = load_model(AutoModelForCausalLM, ModelSpec(id=folder))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
