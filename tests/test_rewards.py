"""Stage `rewards`: which turns are prompts, the relative threshold, and the stage on Ray."""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest

from pipelines.config import RewardsConfig, parse_config
from pipelines.stages.reward_threshold import apply_threshold, margin_zscore, pooled_std, quantile_cutoff, select_pair
from pipelines.stages.rewards import reward_prompts, run_rewards, sample_and_score, sample_id
from pipelines.persona_join import attach_personas
from pipelines.schema import CONVERSATION_PERSONAS, CONVERSATIONS, FOLLOWUPS, PERSONAS, SAMPLES, check_schema

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def scored(candidates, scores):
    return {"candidates": candidates, "scores": scores}


# --- pair selection and threshold ---------------------------------------------------------

def test_best_is_chosen_and_worst_rejected_with_their_margin():
    selection = select_pair(["a", "b", "c"], [0.2, 0.9, 0.1])
    assert (selection.chosen, selection.rejected, selection.reason) == (1, 2, None)
    assert selection.margin == pytest.approx(0.8)


def test_zscore_is_the_margin_over_the_runs_pooled_within_prompt_std():
    # within-prompt variances 0.25 and 0.5 -> pooled std sqrt(0.375)
    assert pooled_std([[0.0, 1.0], [0.0, 1.0, 1.0, 2.0], [7.0]]) == pytest.approx(0.375 ** 0.5)
    assert margin_zscore(2.0, 0.5) == pytest.approx(4.0)
    assert margin_zscore(1.0, 0.0) == 0.0
    # the same prompts on a 100x larger scale give the same z: scale-free
    small, large = [[0.0, 0.1, 0.3], [0.2, 0.25]], [[0.0, 10.0, 30.0], [20.0, 25.0]]
    assert 0.3 / pooled_std(small) == pytest.approx(30.0 / pooled_std(large))


def test_zscore_threshold_keeps_prompts_whose_margin_is_large_for_this_model():
    rows = [scored(["a", "b", "c", "d"], [0.0, 1.0, 1.0, 2.0]),   # margin 2, var 0.5
            scored(["a", "b", "c", "d"], [0.0, 0.1, 0.1, 0.2])]   # margin 0.2, var 0.005
    apply_threshold(rows, RewardsConfig(threshold="zscore", min_z=1.0))   # pooled std 0.51
    assert [(r["status"], r["reason"]) for r in rows] == [("kept", None), ("filtered", "below_threshold")]
    assert [r["margin"] for r in rows] == pytest.approx([2.0, 0.2])
    # a kept row names its pair (best, worst; first index on ties), a filtered one none
    assert [(r["chosen_index"], r["rejected_index"]) for r in rows] == [(3, 0), (None, None)]


def test_quantile_threshold_keeps_the_top_share_of_this_runs_margins():
    rows = [scored(["a", "b"], [0.0, m]) for m in (1.0, 2.0, 3.0, 4.0)]
    assert quantile_cutoff([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    apply_threshold(rows, RewardsConfig(threshold="quantile", quantile=0.5))
    assert [r["status"] for r in rows] == ["filtered", "filtered", "kept", "kept"]
    assert {r["reason"] for r in rows[:2]} == {"below_threshold"}


def test_a_margin_at_the_quantile_cutoff_passes_as_stored_in_float32_too():
    # The stage fits the cutoff on the actors' float64 margins and decides on the float32
    # ones it stored: 0.7 is stored as 0.699999988..., which must still reach a 0.7 cutoff.
    from pipelines.stages.reward_threshold import Threshold
    settings = RewardsConfig(threshold="quantile", quantile=0.5)
    threshold = Threshold.fit([0.2, 0.7, 0.9], [None, None, None], settings)
    stored = [float(np.float32(m)) for m in (0.2, 0.7, 0.9)]
    assert [threshold.passes(m, settings) for m in stored] == [False, True, True]
    assert [threshold.passes(m, settings) for m in (0.2, 0.7, 0.9)] == [False, True, True]


def test_a_best_candidate_cut_at_the_token_limit_makes_no_pair():
    rows = [scored(["a long answer that was cut", "b", "c"], [3.0, 1.0, 0.0]),
            scored(["a", "b complete", "c"], [0.0, 3.0, 1.0])]
    for row, cut in zip(rows, ([True, False, False], [True, False, True])):
        row["truncated"] = cut        # a cut rejected candidate is no reason to drop the pair
    apply_threshold(rows, RewardsConfig(threshold="quantile", quantile=0.0))
    assert [(r["status"], r["reason"]) for r in rows] == [("filtered", "truncated_chosen"), ("kept", None)]
    again = [scored(["a long answer that was cut", "b", "c"], [3.0, 1.0, 0.0]) | {"truncated": [True, False, False]}]
    apply_threshold(again, RewardsConfig(threshold="quantile", quantile=0.0, drop_truncated_chosen=False))
    assert again[0]["status"] == "kept"


def test_tied_scores_make_no_pair_and_do_not_count_towards_the_quantile():
    rows = [scored(["a", "b", "c"], [0.5, 0.5, 0.5]), scored(["a", "b"], [0.0, 1.0])]
    apply_threshold(rows, RewardsConfig(threshold="quantile", quantile=0.5))
    assert (rows[0]["status"], rows[0]["reason"], rows[0]["margin"]) == ("filtered", "tied_scores", 0.0)
    assert rows[1]["status"] == "kept"


def test_a_single_candidate_is_guarded_not_divided_by_zero():
    rows = [scored(["only"], [0.7])]
    apply_threshold(rows, RewardsConfig())
    assert (rows[0]["status"], rows[0]["reason"], rows[0]["margin"]) == ("filtered", "too_few_candidates", None)


def test_identical_or_empty_candidates_make_no_pair():
    assert select_pair(["same", "same "], [0.1, 0.9]).reason == "identical_candidates"
    assert select_pair(["same", "other", "same"], [0.9, 0.5, 0.1]).reason == "identical_candidates"
    assert select_pair(["", "answer"], [0.1, 0.9]).reason == "empty_candidate"
    assert select_pair(["a", "b"], [float("nan"), 0.9]).reason == "invalid_scores"


def test_over_cap_rows_stay_filtered():
    rows = [{"candidates": [], "scores": [], "status": "filtered", "reason": "over_cap", "margin": None}]
    apply_threshold(rows, RewardsConfig())
    assert rows[0]["reason"] == "over_cap"


def test_sample_id_is_stable_and_differs_by_round():
    assert sample_id("c1", 2, 0) == sample_id("c1", 2, 0)
    assert sample_id("c1", 2, 0) != sample_id("c1", 2, 1)
    assert sample_id("c1", 2, 0) != sample_id("c1", 4, 0)


# --- which turns are prompts --------------------------------------------------------------

def turn(role, content, minutes):
    return {"role": role, "content": content, "timestamp": T0 + timedelta(minutes=minutes), "turn_identifier": 1}


def conversations_table():
    return pa.Table.from_pylist([
        {"conversation_id": "c1", "user_id": "u1", "timestamp": T0 + timedelta(minutes=9), "system": "Be brief.",
         "turns": [turn("user", "Write a poem.", 0), turn("assistant", "Roses.", 1),
                   turn("user", "Longer, please.", 2), turn("assistant", "Roses are red.", 3),
                   turn("user", "Thanks! Now a limerick.", 4), turn("assistant", "There once...", 5),
                   turn("user", "Now a haiku.", 6), turn("assistant", "Old pond.", 7)]},
        {"conversation_id": "c2", "user_id": "u2", "timestamp": T0, "system": None,
         "turns": [turn("user", "Capital of France?", 0), turn("assistant", "Lyon.", 1),
                   turn("user", "No, that's wrong.", 2), turn("assistant", "Paris.", 3)]},
    ], schema=CONVERSATIONS)


def followups_table():
    labels = [("c1", 2, "reattempt_feedback"), ("c1", 4, "new_request"), ("c1", 6, "new_request"),
              ("c2", 2, "correction")]
    return pa.Table.from_pylist([{"conversation_id": c, "turn_index": i, "label": label}
                                 for c, i, label in labels], schema=FOLLOWUPS)


def prompts(**flags):
    settings = {"include_first_turns": True, "include_no_feedback_turns": True, **flags}
    found, covered = reward_prompts(conversations_table(), followups_table(), **settings)
    return [(p["conversation_id"], p["turn_index"]) for p in found], covered, found


def test_first_turns_and_turns_without_feedback_are_prompts():
    keys, covered, _ = prompts()
    # c1 turn 2 is followed by new_request: a prompt; c1 turn 4 and 6 too. First turns are
    # prompts even when their follow-up is feedback (c1 turn 0, c2 turn 0); a last turn has
    # no follow-up at all, so no feedback (c2 turn 2).
    assert keys == [("c1", 0), ("c1", 2), ("c1", 4), ("c1", 6), ("c2", 0), ("c2", 2)]
    assert covered == 0


def test_turns_followed_by_feedback_are_left_to_rewrites():
    keys, covered, _ = prompts(include_first_turns=False)
    assert keys == [("c1", 2), ("c1", 4), ("c1", 6), ("c2", 2)]
    assert covered == 2   # both first turns have feedback follow-ups


def test_only_first_turns_when_no_feedback_turns_are_off():
    keys, _, _ = prompts(include_no_feedback_turns=False)
    assert keys == [("c1", 0), ("c2", 0)]


def test_the_context_starts_with_the_system_message_and_ends_with_the_user_turn():
    _, _, found = prompts()
    by_key = {(p["conversation_id"], p["turn_index"]): p for p in found}
    context = by_key[("c1", 2)]["context"]
    assert context[0] == {"role": "system", "content": "Be brief."}
    assert context[-1] == {"role": "user", "content": "Longer, please."}
    assert len(context) == 4
    assert by_key[("c2", 0)]["context"] == [{"role": "user", "content": "Capital of France?"}]
    assert by_key[("c1", 2)]["time"] == T0 + timedelta(minutes=2)


def test_a_turn_sees_the_persona_of_its_conversation_and_never_a_later_one(tmp_path):
    (tmp_path / "personas" / "personas").mkdir(parents=True)
    (tmp_path / "personas" / "conversation_personas").mkdir(parents=True)
    snapshots = [("p0", 0, "from before c1"), ("p1", 1, "after c1 (its own feedback)"), ("p2", 2, "after c2")]
    pq.write_table(pa.Table.from_pylist(
        [{"persona_id": pid, "user_id": "u1", "as_of": T0, "conversations_before": k, "persona": text,
          "serving": False} for pid, k, text in snapshots], schema=PERSONAS),
        tmp_path / "personas" / "personas" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(
        [{"conversation_id": "c1", "user_id": "u1", "persona_id": "p0", "conversation_index": 0}],
        schema=CONVERSATION_PERSONAS), tmp_path / "personas" / "conversation_personas" / "part-0.parquet")
    import pandas as pd

    frame = pd.DataFrame(prompts()[2])
    frame = frame[frame["user_id"] == "u1"]
    joined = attach_personas(frame, tmp_path, user_agnostic=False)
    # every turn of c1, however late, sees the snapshot from before c1, not c1's own
    assert dict(zip(joined["turn_index"], joined["persona_id"])) == {0: "p0", 2: "p0", 4: "p0", 6: "p0"}
    assert set(joined["persona"]) == {"from before c1"}
    agnostic = attach_personas(frame, tmp_path, user_agnostic=True)
    assert set(agnostic["persona"]) == {""} and agnostic["persona_id"].isna().all()


# --- sampling and scoring, without Ray ----------------------------------------------------

def test_sample_and_score_keeps_every_candidate_and_gives_the_reward_model_the_persona(tiny_models, tiny_engine):
    from actors.policy_sampler import PolicySampler
    from actors.reward_model import RewardModel
    from tiny_models import RecordingEngine

    spec = {"id": str(tiny_models.causal_lm), "max_new_tokens": 8}
    sampler = PolicySampler(spec, n=2, engine=tiny_engine)
    judge = RecordingEngine(tiny_engine)
    reward_model = RewardModel("judge", spec, engine=judge)
    context = [{"role": "user", "content": "Hi"}]
    rows = sample_and_score(sampler, reward_model, ["likes cats", ""], [context, context])
    assert [len(r["candidates"]) for r in rows] == [2, 2] and [len(r["scores"]) for r in rows] == [2, 2]
    assert rows[0]["prompt"][-1] == {"role": "user", "content": "Hi"} and "likes cats" in rows[0]["prompt"][0]["content"]
    # each candidate is scored in its own judge prompt, with the persona only where there is one
    assert len(judge.prompts) == 4
    rendered = [" ".join(m["content"] for m in prompt) for prompt in judge.prompts]
    assert ["likes cats" in text for text in rendered] == [True, True, False, False]
    assert all(c in text for c, text in zip(rows[0]["candidates"] + rows[1]["candidates"], rendered))
    assert rows[0]["scores"] == reward_model.score("likes cats", context, rows[0]["candidates"])


# --- the stage on Ray ---------------------------------------------------------------------

# `rewards_run`: a session fixture in conftest.py (test_pairs.py builds on the same run).


def test_run_rewards_accounts_for_every_prompt_and_stores_all_candidates(rewards_run):
    config, summary = rewards_run
    samples = pq.read_table(f"{config.run_dir}/rewards/samples")
    check_schema(samples.select(SAMPLES.names).cast(SAMPLES), SAMPLES, "samples")
    rows = samples.to_pylist()
    assert summary["prompts"] == len(rows) > 12
    assert summary["kept"] + sum(summary["filtered"].values()) == len(rows)
    sampled = [r for r in rows if r["reason"] != "over_cap"]
    assert len(sampled) == summary["sampled"] == 12
    assert all(len(r["candidates"]) == len(r["scores"]) == 3 for r in sampled)
    assert all(0 <= s <= 1 for r in sampled for s in r["scores"])   # judge backend: P(yes)
    assert all(r["prompt"][-1]["role"] == "user" for r in sampled)
    assert all(r["candidates"] == [] and r["status"] == "filtered"
               for r in rows if r["reason"] == "over_cap")
    assert len({r["sample_id"] for r in rows}) == len(rows)
    # each actor wrote its own batch of 6 prompts, thresholded in place; over-cap prompts apart
    parts = {p.name: pq.ParquetFile(p).metadata.num_rows for p in Path(config.run_dir, "rewards", "samples").iterdir()}
    assert parts == {"part-000000.parquet": 6, "part-000001.parquet": 6, "part-over-cap.parquet": len(rows) - 12}


def test_run_rewards_writes_summary_and_manifest_with_upstream(rewards_run):
    config, summary = rewards_run
    folder = f"{config.run_dir}/rewards"
    assert json.loads(open(f"{folder}/summary.json").read())["prompts"] == summary["prompts"]
    manifest = json.loads(open(f"{folder}/manifest.json").read())
    assert set(manifest["upstream"]) == {"ingest", "followups", "personas"}


def test_the_trained_backend_needs_this_runs_reward_model_stage(pipeline_run, tmp_path):
    source, _ = pipeline_run
    shutil.copytree(source, tmp_path / "run")
    config = parse_config({"run_dir": str(tmp_path / "run"), "rewards": {"backend": "trained"}})
    with pytest.raises(RuntimeError, match="run the reward_model stage first"):
        run_rewards(config)
