"""Stage `evaluate`: reasoning scoring, judged win rates, the bootstrap over users, and the
stage's outputs on a small hand-made run directory."""
from __future__ import annotations

import json
import math
import re
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.engines.base import Completion, SamplingParams
from actors.models import ModelSpec
from actors.policy_sampler import PolicySampler
from pipelines.stages.evaluate import stats
from pipelines.config import BenchmarkConfig, parse_config
from pipelines.stages.evaluate.reasoning import extract_gsm8k, gsm8k_gold, matches, read_jsonl
from pipelines.stages.evaluate.items import EvalItem, benchmark_items, benchmark_path
from pipelines.stages.evaluate.stage import (Arms, judge_pairs,
                                reasoning_block, run_evaluate, win_block)
from pipelines.schema import CONVERSATION_PERSONAS, CONVERSATIONS, PERSONAS, USERS
from pipelines.contract import StageWriter

CANDIDATE = re.compile(r'<candidate id="([AB])">\n(.*?)\n</candidate>', re.S)


class ScriptedEngine:
    """An engine that behaves a known way: `answer(last user message) -> text` for
    generation, `prefer(text of A, text of B) -> "A" or "B"` for the judge's label scores."""

    max_context_tokens = 100_000

    def __init__(self, answer=lambda question: "an answer", prefer=lambda a, b: "A"):
        self.answer, self.prefer = answer, prefer

    def generate(self, prompts, params: SamplingParams):
        return [[Completion(self.answer(p[-1]["content"]), 3, "stop")] * params.n for p in prompts]

    def score_continuations(self, prompts, continuations):
        out = []
        for prompt in prompts:
            shown = dict(CANDIDATE.findall(prompt[-1]["content"]))
            better = self.prefer(shown["A"], shown["B"])
            out.append([0.0 if label == better else -5.0 for label in ("A", "B")])
        return out

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 1 for m in messages)


def scripted_arms(trained="TRAINED answer", base="base answer", prefer=lambda a, b: "A", policy=None):
    trained_engine = ScriptedEngine(policy or (lambda q: trained))
    base_engine = ScriptedEngine(policy or (lambda q: base))
    return Arms(base=PolicySampler("base", engine=base_engine), trained=PolicySampler("trained", engine=trained_engine),
                judge_spec=ModelSpec(id="scripted-judge"),
                judge_engine=ScriptedEngine(prefer=prefer), params=SamplingParams(max_new_tokens=16),
                batch_size=3, reason_tokens=0, persona_in_prompt=True)


def user_items(n_users=4, per_user=2):
    return [EvalItem(f"u{u}-{t}", f"u{u}", "first", [{"role": "user", "content": f"question {u} {t}"}], "likes cats")
            for u in range(n_users) for t in range(per_user)]


# --- reasoning ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, gold", [("#### 42", "42"), ("The answer is 1,234.", "1234"), ("$18", "18"),
                                        ("So she makes 9 * 2 = 18 dollars.", "18")])
def test_gsm8k_final_answers_are_extracted_and_match(text, gold):
    assert matches(gold, extract_gsm8k(text), latex=False)


def test_gsm8k_gold_is_the_number_after_the_hashes():
    assert gsm8k_gold("She has 2 + 3 = 5\n#### 1,005") == "1005"


def test_a_broken_benchmark_file_is_named_with_its_line(tmp_path):
    from pipelines.stages.evaluate.reasoning import load_gsm8k
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n{"question": "2+2?", "answer": "4 ####"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}, row 2 \(question '2\+2\?'\): GSM8K answer has no"):
        load_gsm8k(bad, 2, "first", 0)
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", \n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad))}:2: not valid JSON"):
        read_jsonl(bad, ("question", "answer"))


@pytest.mark.parametrize("gold, answer, equal", [
    ("\\frac{1}{2}", "so \\boxed{0.5}", True), ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\sqrt{2}", "The answer is \\boxed{\\sqrt 2}", True), ("(1,2]", "\\boxed{\\left(1, 2\\right]}", True),
    ("(1,2]", "\\boxed{[1,2]}", False), ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False)])
def test_math500_answers_match_by_math_verify(gold, answer, equal):
    assert matches(gold, answer, latex=True) is equal


def test_an_answer_gets_room_for_evaluate_max_new_tokens_not_the_policys_own():
    engine = ScriptedEngine()
    engine.max_context_tokens, seen = 300, []
    engine.generate = lambda prompts, params: seen.extend(prompts) or [[Completion("x", 1, "stop")] for _ in prompts]
    arms = Arms(base=PolicySampler(ModelSpec(id="base", max_new_tokens=16), engine=engine), trained=None,
                judge_spec=ModelSpec(id="judge"), judge_engine=engine, params=SamplingParams(max_new_tokens=200),
                batch_size=4, reason_tokens=0, persona_in_prompt=False)
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(["word"] * 30)}
                 for i in range(11)]
    arms.answer(arms.base, [EvalItem("i0", "u0", "followup", long_chat, None)])
    # 300 tokens of context window: 200 for the answer, so the prompt holds at most 100.
    assert engine.count_tokens(seen[0]) <= 100 and seen[0][-1] == long_chat[-1]


@pytest.mark.parametrize("kind", ["gsm8k", "math500"])
def test_a_policy_returning_the_gold_answer_scores_100_percent(kind):
    path = f"data/eval/{'gsm8k_test' if kind == 'gsm8k' else 'math500_test'}.jsonl"
    gold = {}
    for row in read_jsonl(benchmark_path(path), ()):
        question = row.get("question") or row["problem"]
        gold[question] = (f"Step by step. The answer is {gsm8k_gold(row['answer'])}." if kind == "gsm8k"
                          else f"Thus \\boxed{{{row['answer']}}}")
    oracle = lambda prompt: gold[prompt.rsplit("\n\n", 1)[0]]
    pairs = benchmark_items(kind, BenchmarkConfig(path=path, n=5, subset="sample"), seed=1)
    block, rows = reasoning_block(scripted_arms(policy=oracle), kind, pairs, samples=200, seed=0, path=path)
    assert block["trained"]["mean"] == block["base"]["mean"] == 1.0
    assert len(rows) == 10 and all(r["correct"] for r in rows)


# --- judged win rates ---------------------------------------------------------------------

def test_a_judge_preferring_the_trained_answer_gives_a_win_rate_of_one():
    arms = scripted_arms(prefer=lambda a, b: "A" if "TRAINED" in a else "B")
    items = user_items()
    rows = judge_pairs(arms, "usereval", "overall", items, arms.answer(arms.trained, items),
                       arms.answer(arms.base, items))
    block = win_block(rows, samples=200, seed=0)
    assert block["win_rate"]["mean"] == 1.0 and block["loss"]["mean"] == 0.0
    assert block["position_consistency"] == 1.0 and block["judge"] == "scripted-judge"


def test_position_swapping_cancels_a_judge_that_always_prefers_a():
    arms = scripted_arms(prefer=lambda a, b: "A")
    items = user_items()
    rows = judge_pairs(arms, "usereval", "overall", items, ["x"] * len(items), ["y"] * len(items))
    block = win_block(rows, samples=200, seed=0)
    assert {r.winner for r in rows} == {"tie"}
    assert block["win_rate"]["mean"] == 0.5 and block["tie"]["mean"] == 1.0
    assert block["position_consistency"] == 0.0


def test_the_judge_prompt_carries_the_criterion():
    seen = []
    engine = ScriptedEngine()
    engine.score_continuations = lambda prompts, c: seen.extend(prompts) or [[0.0, -1.0]] * len(prompts)
    arms = scripted_arms()
    arms.judge_engine = engine
    judge_pairs(arms, "usereval", "personalization", user_items(1, 1), ["x"], ["y"])
    assert "better fits this particular user" in seen[0][0]["content"]


# --- statistics ---------------------------------------------------------------------------

def test_length_control_recovers_one_half_when_length_explains_every_win():
    rng = np.random.default_rng(0)
    base = rng.integers(50, 150, size=400).astype(float)
    trained = base * rng.uniform(0.8, 2.0, size=400)      # trained mostly longer
    x = stats.relative_length_difference(trained, base)
    wins = (rng.random(400) < 1 / (1 + np.exp(-4 * x))).astype(float)
    users = [f"u{i % 80}" for i in range(400)]
    result = stats.length_controlled(wins, trained, base, users, samples=100, seed=0)
    assert wins.mean() > 0.7
    assert abs(result["mean"] - 0.5) < 0.08 and result["ci_low"] < 0.5 < result["ci_high"]


# --- the stage ----------------------------------------------------------------------------

def _write(folder, name, rows, schema):
    (folder / name).mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name / "part-0.parquet")


@pytest.fixture
def small_run(tmp_path, tiny_models):
    """A run dir with 3 eval users (two conversations each, with follow-up turns), one train
    user, their persona snapshots, and the tiny LM saved as the trained policy."""
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    conversations, personas, links = [], [], []
    for u, split in enumerate(["eval", "eval", "eval", "train"]):
        for c in range(2):
            when = t0 + timedelta(days=u * 10 + c)
            turns = [{"role": "user", "content": f"Write a story {u} {c}"},
                     {"role": "assistant", "content": "Once upon a time."},
                     {"role": "user", "content": "Make it longer please."},
                     {"role": "assistant", "content": "Once upon a long time."}]
            conversations.append({"conversation_id": f"c{u}{c}", "user_id": f"user{u}", "timestamp": when,
                                  "system": "Answer as a pirate." if u == 0 else None,
                                  "turns": [{**t, "timestamp": when} for t in turns]})
            personas.append({"persona_id": f"p{u}{c}", "user_id": f"user{u}", "as_of": when - timedelta(hours=1),
                             "persona": "" if c == 0 else f"user{u} likes stories", "serving": False,
                             "conversations_before": c})
            links.append({"conversation_id": f"c{u}{c}", "user_id": f"user{u}", "persona_id": f"p{u}{c}",
                          "conversation_index": c})
    users = [{"user_id": f"user{u}", "split": s} for u, s in enumerate(["eval", "eval", "eval", "train"])]
    for stage, tables in (("ingest", [("conversations", conversations, CONVERSATIONS)]),
                          ("personas", [("personas", personas, PERSONAS), ("users", users, USERS),
                                        ("conversation_personas", links, CONVERSATION_PERSONAS)])):
        with StageWriter(tmp_path, stage) as writer:
            for name, rows, schema in tables:
                _write(writer.tmp, name, rows, schema)
            writer.commit(config_hash="hand-made", inputs=[], counts={}, seed=0)
    with StageWriter(tmp_path, "train") as writer:
        shutil.copytree(tiny_models.causal_lm, writer.tmp / "model")
        writer.commit(config_hash="hand-made", inputs=[], counts={}, seed=0)
    return tmp_path


def test_run_evaluate_writes_every_block_with_its_judge(small_run, tiny_models):
    tiny = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_context_tokens": 1024}
    config = parse_config({"run_dir": str(small_run), "models": {"policy": tiny, "judge": tiny},
                           "evaluate": {"max_turns": 2, "max_new_tokens": 4, "bootstrap_samples": 50,
                                        "gsm8k": {"path": "data/eval/gsm8k_test.jsonl", "n": 2},
                                        "math500": {"path": "data/eval/math500_test.jsonl", "n": 1},
                                        "arena_hard": {"path": "data/eval/arena-hard-v0.1_question.jsonl", "n": 1},
                                        "judge_checks": 1}})
    summary = run_evaluate(config)
    out = small_run / "evaluate"
    saved = json.loads((out / "summary.json").read_text())
    assert (out / "manifest.json").is_file()
    expected = {f"usereval_{k}_{c}_win" for k in ("first", "followup")
                for c in ("personalization", "instruction_following", "overall")}
    expected |= {"usereval_first_overall_win_lc", "usereval_followup_overall_win_lc", "gsm8k_base_acc",
                 "gsm8k_trained_acc", "math500_base_acc", "math500_trained_acc", "arena_hard_overall_win",
                 "judge_known_pair_accuracy"}
    assert set(saved["arms"]) == expected
    # The trained policy is a byte copy of the base, so both answer every prompt alike
    # (greedy): every verdict is a tie and both arms solve the same problems.
    for name, arm in saved["arms"].items():
        assert arm["judge"] == ("math-verify" if name.endswith("_acc") else str(tiny_models.causal_lm)), name
        if name == "arena_hard_overall_win":   # one question: a mean, and no interval
            assert arm["mean"] == 0.5 and math.isnan(arm["ci_low"]) and math.isnan(arm["ci_high"])
        elif name.endswith(("_win", "_win_lc")):
            assert (arm["mean"], arm["ci_low"], arm["ci_high"]) == (0.5, 0.5, 0.5), name
    for bench in ("gsm8k", "math500"):
        assert saved["arms"][f"{bench}_base_acc"]["mean"] == saved["arms"][f"{bench}_trained_acc"]["mean"]
    assert saved["arms"]["usereval_first_overall_win"]["judge"] == str(tiny_models.causal_lm)
    assert saved["usereval"]["first"]["users"] == 2 and saved["usereval"]["followup"]["turns"] == 2
    assert saved["policies"]["trained"] == str((small_run / "train" / "model").resolve())
    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert {j["judge"] for j in judgements} == {str(tiny_models.causal_lm)}
    assert {j["block"] for j in judgements} == {"usereval", "arena_hard", "judge_check"}
    assert len((out / "reasoning.jsonl").read_text().splitlines()) == 2 * (2 + 1)
    assert summary["output"] == str(out)


def test_user_turns_keep_the_conversations_own_system_message(small_run):
    from pipelines.stages.evaluate.items import user_turns
    config = parse_config({"run_dir": str(small_run), "evaluate": {"max_turns": 20}})
    items = [item for kind in ("first", "followup") for item in user_turns(config)[kind]]
    assert len(items) == 12   # 3 evaluation users x 2 conversations x (first + follow-up)
    for item in items:
        first = item.context[0]
        if item.user_id == "user0":
            assert first == {"role": "system", "content": "Answer as a pirate."}
        else:
            assert first["role"] == "user"


def test_models_on_a_gpu_put_the_stage_in_a_gpu_task(small_run, tiny_models):
    """On a cluster the driver runs on the head node, which often has no GPU: a vLLM or
    cuda model anywhere in the stage must be loaded in a task that holds one."""
    from pipelines.rounds import actor_gpus
    from pipelines.stages.evaluate.stage import model_specs

    tiny = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_context_tokens": 1024}
    on_gpu = {**tiny, "engine": "vllm"}
    for policy, judge, gpus in ((tiny, tiny, 0.0), (on_gpu, tiny, 1.0), (tiny, {**tiny, "device": "cuda"}, 1.0)):
        config = parse_config({"run_dir": str(small_run), "models": {"policy": policy, "judge": judge}})
        specs = model_specs(config)
        assert specs["trained"].id == str((small_run / "train" / "model").resolve())
        assert specs["trained"].engine == policy["engine"]   # the trained policy keeps the policy's engine
        assert actor_gpus(*specs.values()) == gpus


def test_the_stage_measures_the_same_in_a_ray_task(ray_session, small_run, tiny_models):
    """What the GPU task runs, run on a worker (CPU here): it reads the run directory and
    loads the models there, and its result comes back whole."""
    import os
    from pipelines.runtime import in_ray_task
    from pipelines.stages.evaluate.stage import measure

    tiny = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_context_tokens": 1024}
    config = parse_config({"run_dir": str(small_run), "models": {"policy": tiny, "judge": tiny},
                           "evaluate": {"max_turns": 2, "max_new_tokens": 4, "bootstrap_samples": 20,
                                        "criteria": ["overall"], "judge_checks": 0,
                                        **{bench: {"path": path, "n": 0} for bench, path in (
                                            ("gsm8k", "data/eval/gsm8k_test.jsonl"), ("math500", "data/eval/math500_test.jsonl"),
                                            ("arena_hard", "data/eval/arena-hard-v0.1_question.jsonl"))}}})
    here = measure(config)
    there = in_ray_task(measure, config)
    assert there == here
    # Two users' first and follow-up turns (max_turns 2 each), trained == base: all ties.
    assert [(j.kind, j.winner) for j in there[1]] == [("first", "tie")] * 2 + [("followup", "tie")] * 2
    assert in_ray_task(lambda: os.getpid()) != os.getpid()   # it ran in a worker


def test_run_evaluate_sends_a_stage_with_a_gpu_model_to_a_gpu_task(small_run, tiny_models, monkeypatch):
    """The stage itself routes: with a vLLM judge it calls in_ray_task with one GPU (here the
    task runs the CPU twin of the config in this process: no GPU on this machine)."""
    from pipelines.stages.evaluate import stage as evaluate_stage

    tiny = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_context_tokens": 1024}
    settings = {"max_turns": 1, "max_new_tokens": 4, "bootstrap_samples": 20, "criteria": ["overall"],
                "judge_checks": 0, **{bench: {"path": path, "n": 0} for bench, path in (
                    ("gsm8k", "data/eval/gsm8k_test.jsonl"), ("math500", "data/eval/math500_test.jsonl"),
                    ("arena_hard", "data/eval/arena-hard-v0.1_question.jsonl"))}}
    on_gpu = parse_config({"run_dir": str(small_run), "models": {"policy": tiny, "judge": {**tiny, "engine": "vllm"}},
                           "evaluate": settings})
    on_cpu = parse_config({"run_dir": str(small_run), "models": {"policy": tiny, "judge": tiny}, "evaluate": settings})
    calls = []

    def task(fn, config, num_gpus=0.0):
        calls.append((fn.__name__, config.models.judge.engine, num_gpus))
        return fn(on_cpu)

    monkeypatch.setattr(evaluate_stage, "in_ray_task", task)
    evaluate_stage.run_evaluate(on_gpu)
    assert calls == [("measure", "vllm", 1.0)]
    calls.clear()
    evaluate_stage.run_evaluate(on_cpu)      # all on CPU: in the driver
    assert calls == []
