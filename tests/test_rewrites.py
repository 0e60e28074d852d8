"""Stage `rewrites`: the quality filter, one batch with the tiny model (and with scripted
models where a judge or policy must misbehave on purpose), one run on Ray."""
from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest

from actors.engines.base import Completion
from actors.judge import Judge
from actors.policy_sampler import PolicySampler
from actors.prompts import base_system_prompt
from actors.rewriter import Rewriter
from pipelines.stages.rewrites import quality
from pipelines.config import QualityFilterConfig, RewritesConfig, parse_config
from pipelines.stages.rewrites.stage import check_prompt, rewrite_rows, run_rewrites
from pipelines.schema import FEEDBACK_LABELS, REWRITES, check_schema

SETTINGS = QualityFilterConfig(min_tokens=2, max_tokens=20, max_length_ratio=3.0, truncate_tokens=5)
words = str.split  # a whitespace tokenizer: token counts the test can see


# --- the quality filter ---------------------------------------------------------------------

@pytest.mark.parametrize("rewrite, rejected, reason", [
    ("   ", "Paris is the capital.", "empty"),
    ("Paris  is the\ncapital.", "Paris is the capital.", "identical"),
    ("Sure, here is how to pick the lock: ...", "I'm sorry, but I can't help with that.", "refusal_to_compliance"),
    ("Paris.", "Paris is the capital of France.", "too_short"),
    ("Paris.", "OK.", "too_short"),                      # the rejected answer is too short too
    (" ".join(["word"] * 21), " ".join(["other"] * 10), "too_long"),
    ("one two three four five six seven", "one two", "length_ratio"),
    ("a b c d e f g", "a b c d e x y", "identical_after_truncation"),
])
def test_each_cheap_check_drops_its_case_with_its_reason(rewrite, rejected, reason):
    assert quality.cheap_reason(rewrite, rejected, words, SETTINGS) == reason


def test_a_different_answer_of_similar_length_passes_the_cheap_checks():
    assert quality.cheap_reason("Paris is the capital of France.", "Lyon is the capital.", words, SETTINGS) is None


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that.",
    "I\u2019m sorry, but I cannot assist with this request.",
    "Sorry, I can't do that.",
    "I cannot provide instructions for making weapons.",
    "As an AI language model, I cannot write explicit content.",
    "I must respectfully decline.",
    "This request goes against OpenAI's use case policy.",
])
def test_refusals_are_recognised(text):
    assert quality.is_refusal(text)


@pytest.mark.parametrize("text", [
    "Paris is the capital of France.",
    "Here is the poem you asked for: ...",
    "I can help with that! First, preheat the oven.",
    "Sure. " + "x " * 200 + "I can't stress this enough.",   # a late "I can't" is not a refusal
])
def test_answers_that_comply_are_not_refusals(text):
    assert not quality.is_refusal(text)


def test_compliance_to_refusal_is_not_counted_as_refusal_to_compliance():
    assert not quality.refusal_to_compliance("I'm sorry, but I can't help with that.", "Here is how you do it.")
    assert quality.cheap_reason("I'm sorry, but I can't help with that.", "Here is how you do it.",
                                words, SETTINGS) is None


def test_refusal_to_compliance_is_kept_when_the_check_is_off():
    settings = SETTINGS.model_copy(update={"drop_refusal_to_compliance": False})
    assert quality.cheap_reason("Sure, here is the full story you wanted.", "I'm sorry, but I can't help with that.",
                                words, settings) is None


# --- scripted models ------------------------------------------------------------------------

class ScriptedEngine:
    """Replies `reply(prompt)` to every prompt, prefers the judge candidate holding BETTER,
    counts words as tokens and records every prompt it sees."""

    max_context_tokens = 100_000

    def __init__(self, reply=lambda prompt: "", finish_reason="stop"):
        self.reply, self.prompts, self.finish_reason = reply, [], finish_reason

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 4 for m in messages)

    def generate(self, prompts, params):
        self.prompts += [list(p) for p in prompts]
        return [[Completion(self.reply(p), 5, self.finish_reason)] * params.n for p in prompts]

    def score_continuations(self, prompts, continuations):
        self.prompts += [list(p) for p in prompts]
        scores = []
        for prompt, labels in zip(prompts, continuations):
            first = re.search(r'<candidate id="A">\n(.*?)\n</candidate>', prompt[-1]["content"], re.S).group(1)
            scores.append([0.0, -3.0] if "BETTER" in first else [-3.0, 0.0])
        return scores


CONTEXT = [{"role": "user", "content": "Name the capital of France in a sentence."}]
FOLLOWUP = "No, that's wrong. Paris is the capital."
PERSONA = "Geography teacher; likes one-line answers."


def _row(**changes):
    row = {"followup_id": "f1", "conversation_id": "c1", "user_id": "u1", "turn_index": 2,
           "context": CONTEXT, "answer": "Lyon is the capital of France.", "message": FOLLOWUP,
           "label": "correction", "persona_id": "p1", "persona": PERSONA}
    return {**row, **changes}


def _roles(policy="Marseille is the capital city.", rewrite="BETTER: Paris is the capital of France.",
           judge=None):
    engines = {"policy": ScriptedEngine(lambda p: policy), "rewriter": ScriptedEngine(lambda p: rewrite),
               "judge": ScriptedEngine(lambda p: "A is better.")}
    roles = {"sampler": PolicySampler("scripted", n=1, engine=engines["policy"]),
             "rewriter": Rewriter("scripted", engine=engines["rewriter"]),
             "judge": judge or Judge("scripted", engine=engines["judge"])}
    return roles, engines


def _run(rows, settings=RewritesConfig(), **options):
    roles, engines = _roles(**options.pop("roles", {}))
    out = rewrite_rows(rows, **roles, tokenize=words, settings=settings, **options)
    return out, engines


# --- one batch with the tiny real model -----------------------------------------------------

@pytest.fixture
def tiny_roles(tiny_models, tiny_engine):
    """The three roles on the tiny Llama, each through its own recording view of one engine."""
    from tiny_models import RecordingEngine

    spec = {"id": str(tiny_models.causal_lm), "max_new_tokens": 8}
    engines = {name: RecordingEngine(tiny_engine) for name in ("policy", "rewriter", "judge")}
    roles = {"sampler": PolicySampler(spec, n=1, engine=engines["policy"]),
             "rewriter": Rewriter(spec, engine=engines["rewriter"]),
             "judge": Judge(spec, engine=engines["judge"], reason_tokens=0)}
    return roles, engines


# The tiny random model never ends an answer: every rewrite is cut at max_new_tokens.
def _run_tiny(tiny_roles, rows, settings=RewritesConfig(filter=QualityFilterConfig(min_tokens=1, drop_truncated=False)),
              **options):
    roles, engines = tiny_roles
    return rewrite_rows(rows, **roles, tokenize=words, settings=settings, **options), engines


def test_the_regenerated_answer_is_rejected_and_the_rewrite_of_it_chosen(tiny_roles):
    [row], engines = _run_tiny(tiny_roles, [_row()])
    roles, _ = tiny_roles
    again = roles["sampler"].sample_batch([PERSONA], [CONTEXT])[0]     # seeded: the same draw
    assert row["rejected"] == again.candidates[0].strip() and row["rejected_source"] == "regenerated"
    rewrite = roles["rewriter"].rewrite(PERSONA, CONTEXT, row["rejected"], FOLLOWUP)   # greedy
    assert row["chosen"] == rewrite.text
    assert row["rejected"] in engines["rewriter"].prompts[0][-2]["content"] + engines["rewriter"].prompts[0][-1]["content"]


def test_the_prompt_is_the_policy_prompt_ending_at_the_answered_turn_without_the_followup(tiny_roles):
    [row], engines = _run_tiny(tiny_roles, [_row()])
    assert row["prompt"][1:] == CONTEXT and row["prompt"][-1]["role"] == "user"
    assert PERSONA in row["prompt"][0]["content"]
    assert all(FOLLOWUP not in m["content"] for m in row["prompt"])
    assert engines["policy"].prompts == [row["prompt"]]          # sampled from the DPO prompt itself


def test_rejected_original_uses_the_logged_answer_without_sampling(tiny_roles):
    settings = RewritesConfig(rejected="original", filter=QualityFilterConfig(min_tokens=1))
    [row], engines = _run_tiny(tiny_roles, [_row()], settings=settings)
    assert (row["rejected"], row["rejected_source"]) == ("Lyon is the capital of France.", "original")
    assert engines["policy"].prompts == []
    assert row["prompt"][1:] == CONTEXT


def test_the_rewriter_sees_the_followup_but_not_from_scratch(tiny_roles, tiny_models, tiny_engine):
    from tiny_models import RecordingEngine

    _, guided = _run_tiny(tiny_roles, [_row()])
    scratch_roles = ({**tiny_roles[0], "rewriter": Rewriter({"id": str(tiny_models.causal_lm)},
                                                            engine=RecordingEngine(tiny_engine))}, None)
    _run_tiny(scratch_roles, [_row()], from_scratch=True)
    scratch_prompt = scratch_roles[0]["rewriter"].engine.prompts[0]
    assert FOLLOWUP in guided["rewriter"].prompts[0][-1]["content"]
    assert all(FOLLOWUP not in m["content"] for m in scratch_prompt)
    assert "<user_message>" not in scratch_prompt[-1]["content"]


def test_user_agnostic_rows_have_no_persona_block_for_any_role(tiny_roles):
    [row], engines = _run_tiny(tiny_roles, [_row(persona="", persona_id=None)])
    assert row["prompt"][0]["content"] == base_system_prompt() and row["persona_id"] is None
    seen = [p for e in engines.values() for p in e.prompts]
    assert len({id(e) for e in engines.values()}) == 3 and all(e.prompts for e in engines.values())
    assert all("<persona>" not in m["content"] for p in seen for m in p)


# --- scripted models: a model that misbehaves on purpose -------------------------------------

def test_a_rewrite_the_judge_does_not_prefer_is_below_margin():
    [row], _ = _run([_row()], roles={"rewrite": "Paris, France's capital, is there.",
                                     "policy": "BETTER: Marseille is the capital."})
    assert (row["status"], row["reason"]) == ("filtered", "below_margin") and row["margin"] < 0


def test_a_rewrite_cut_at_the_token_limit_is_dropped_before_the_judge():
    roles, engines = _roles()
    roles["rewriter"] = Rewriter("scripted", engine=ScriptedEngine(lambda p: "BETTER: Paris is", "length"))
    [row] = rewrite_rows([_row()], **roles, tokenize=words, settings=RewritesConfig())
    assert (row["status"], row["reason"]) == ("filtered", "truncated") and engines["judge"].prompts == []
    kept_off = RewritesConfig(filter=QualityFilterConfig(drop_truncated=False))
    [row] = rewrite_rows([_row()], **roles, tokenize=words, settings=kept_off)
    assert row["reason"] is None


def test_a_judge_that_only_follows_position_gives_no_margin():
    [row], _ = _run([_row()], roles={"rewrite": "Paris, France's capital, is there."})
    assert row["reason"] == "below_margin" and row["margin"] == pytest.approx(0.0)


def test_the_judge_only_sees_pairs_that_passed_the_cheap_checks():
    rows = [_row(), _row(followup_id="f2", turn_index=4)]
    roles, engines = _roles(policy="BETTER: Paris is the capital of France.")   # identical to the rewrite
    out = rewrite_rows(rows, **roles, tokenize=words, settings=RewritesConfig())
    assert [r["reason"] for r in out] == ["identical", "identical"]
    assert engines["judge"].prompts == [] and all(r["margin"] is None for r in out)


def test_a_followup_without_an_answered_user_turn_is_filtered_without_model_calls():
    rows = [_row(context=[]), _row(followup_id="f2", context=[{"role": "system", "content": "Be brief."}])]
    out, engines = _run(rows)
    assert [r["reason"] for r in out] == ["no_user_turn"] * 2
    assert not any(e.prompts for e in engines.values())


def test_a_refused_request_rewritten_into_compliance_is_dropped():
    [row], _ = _run([_row()], roles={"policy": "I'm sorry, but I can't help with that."})
    assert (row["status"], row["reason"]) == ("filtered", "refusal_to_compliance")


# --- the stage on Ray -----------------------------------------------------------------------

def test_run_rewrites_accounts_for_every_feedback_followup(pipeline_run, tiny_models, tmp_path):
    source, _ = pipeline_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    followups = pq.read_table(run_dir / "followups" / "followups").to_pylist()
    feedback = {f["followup_id"] for f in followups if f["label"] in FEEDBACK_LABELS}
    assert len(feedback) > 4, "the bundled sample should hold feedback follow-ups"
    cap = 4  # model calls on CPU are slow: the rest are counted over the cap
    tiny = {"id": str(tiny_models.causal_lm), "max_new_tokens": 8}
    config = parse_config({"run_dir": str(run_dir), "resources": {"progress_bars": False},
                           "models": {"policy": tiny, "rewriter": tiny, "judge": tiny},
                           "rewrites": {"batch_size": 2, "workers": 2, "max_followups": cap}})

    summary = run_rewrites(config)

    table = pq.read_table(run_dir / "rewrites" / "rewrites")
    check_schema(table, REWRITES, "rewrites")
    rows = table.to_pylist()
    assert {r["followup_id"] for r in rows} == feedback and len(rows) == len(feedback)
    assert summary["followups_in"] == len(feedback)
    assert summary["kept"] == sum(r["status"] == "kept" for r in rows)
    assert summary["filtered"]["over_cap"] == len(feedback) - cap
    assert summary["kept"] + sum(summary["filtered"].values()) == len(feedback)
    assert all(r["reason"] is not None for r in rows if r["status"] == "filtered")
    by_id = {f["followup_id"]: f for f in followups}
    for row in rows:
        if row["prompt"] is not None:
            assert row["prompt"][-1]["role"] == "user"
            assert row["prompt"][-1]["content"] == by_id[row["followup_id"]]["context"][-1]["content"]
    manifest = json.loads((run_dir / "rewrites" / "manifest.json").read_text())
    assert manifest["counts"]["followups_in"] == len(feedback)
    assert set(manifest["upstream"]) == {"followups", "personas"} and len(manifest["models"]) == 3
    assert json.loads((run_dir / "rewrites" / "summary.json").read_text())["kept"] == summary["kept"]
    # each actor wrote its own batch (2 of 2 follow-ups); the over-cap rows have a part of their own
    parts = {p.name: pq.ParquetFile(p).metadata.num_rows for p in (run_dir / "rewrites" / "rewrites").iterdir()}
    assert parts == {"part-000000.parquet": 2, "part-000001.parquet": 2, "part-over-cap.parquet": len(feedback) - cap}
