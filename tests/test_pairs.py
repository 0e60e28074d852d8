"""Stage `pairs`: both sources in TRL's conversational format, split by user, checked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.stages.pairs import EVAL_DATA, PairError, check_not_eval_data, check_pair, reward_pairs, run_pairs
from pipelines.persona_join import user_splits
from pipelines.schema import PAIRS, REWRITES, SAMPLES, check_schema
from pipelines.contract import StageWriter

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
QUESTION = {"role": "user", "content": "Capital of France?"}


def pair(**fields):
    row = {"pair_id": "p1", "source": "reward", "conversation_id": "c1", "followup_id": None,
           "prompt": [SYSTEM, QUESTION], "chosen": [{"role": "assistant", "content": "Paris."}],
           "rejected": [{"role": "assistant", "content": "Lyon."}]}
    return {**row, **fields}


# --- checks -------------------------------------------------------------------------------

def test_a_good_pair_passes_the_checks():
    check_pair(pair())


def test_a_prompt_that_does_not_end_with_a_user_message_is_refused_by_name():
    with pytest.raises(PairError, match="pair p1 .*must end with a user message"):
        check_pair(pair(prompt=[SYSTEM, QUESTION, {"role": "assistant", "content": "Lyon."}]))


def test_chosen_equal_to_rejected_is_refused():
    with pytest.raises(PairError, match="pair p1 .*same text"):
        check_pair(pair(rejected=[{"role": "assistant", "content": "Paris. "}]))


def test_a_rewrite_prompt_containing_the_follow_up_is_refused():
    followup = {"message": "No, that's wrong.", "context": [QUESTION]}
    leaked = [SYSTEM, QUESTION, {"role": "assistant", "content": "Lyon."},
              {"role": "user", "content": "No, that's wrong."}]
    with pytest.raises(PairError, match="pair p1 .*follow-up"):
        check_pair(pair(source="rewrite", followup_id="f1", prompt=leaked), followup)


def test_a_follow_up_repeating_an_earlier_user_turn_is_not_a_leak():
    followup = {"message": "Capital of France?", "context": [QUESTION]}
    check_pair(pair(source="rewrite", followup_id="f1"), followup)


def test_no_input_may_come_from_the_held_out_eval_data(tmp_path):
    with pytest.raises(RuntimeError, match="must not read"):
        check_not_eval_data([EVAL_DATA / "benchmark" / "part-0.parquet"])
    check_not_eval_data([tmp_path / "followups"])


def test_a_reward_pair_is_the_pair_the_rewards_stage_recorded():
    samples = pa.Table.from_pylist([
        {"sample_id": "s1", "user_id": "u1", "persona_id": "p", "conversation_id": "c1", "turn_index": 0,
         "prompt": [SYSTEM, QUESTION], "candidates": ["Lyon.", "Paris.", "Nice."], "scores": [0.2, 0.9, 0.1],
         "round": 0, "status": "kept", "margin": 0.8, "chosen_index": 1, "rejected_index": 2},
        {"sample_id": "s2", "user_id": "u1", "conversation_id": "c1", "turn_index": 2, "prompt": [],
         "candidates": [], "scores": [], "round": 0, "status": "filtered", "reason": "over_cap"},
    ], schema=SAMPLES)
    [row] = reward_pairs(samples)
    assert row["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Nice."}]
    assert (row["sample_id"], row["followup_id"], row["source"]) == ("s1", None, "reward")


def test_a_kept_sample_without_its_pair_is_refused_by_name():
    samples = pa.Table.from_pylist([
        {"sample_id": "s1", "user_id": "u1", "conversation_id": "c1", "turn_index": 0, "prompt": [SYSTEM, QUESTION],
         "candidates": ["Lyon.", "Paris."], "scores": [0.2, 0.9], "round": 0, "status": "kept", "margin": 0.7,
         "chosen_index": 5, "rejected_index": 0}], schema=SAMPLES)
    with pytest.raises(PairError, match="sample s1 .*chosen_index 5"):
        reward_pairs(samples)


# --- the stage ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rewarded_run(rewards_run):
    """The session's rewards run (conftest.py); tests copy it before writing."""
    config, _ = rewards_run
    return Path(config.run_dir)


def copy_run(source, tmp_path, **overrides):
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    return parse_config({"run_dir": str(run_dir), "resources": {"progress_bars": False}, **overrides})


def write_rewrites(run_dir, count=3):
    """A hand-written REWRITES table from real follow-ups: `count` kept and one filtered."""
    run_dir = Path(run_dir)
    followups = pq.read_table(run_dir / "followups" / "followups").to_pylist()[: count + 1]
    rows = [{"followup_id": f["followup_id"], "conversation_id": f["conversation_id"], "user_id": f["user_id"],
             "persona_id": None, "turn_index": f["turn_index"], "prompt": [SYSTEM, *f["context"]],
             "chosen": f"A better answer {i}.", "rejected": f["answer"], "rejected_source": "original",
             "label": "correction" if i % 2 else "complaint", "margin": 0.25,
             "status": "kept" if i < count else "filtered", "reason": None if i < count else "too_long",
             "round": 0} for i, f in enumerate(followups)]
    with StageWriter(run_dir, "rewrites") as stage:
        (stage.tmp / "rewrites").mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=REWRITES), stage.tmp / "rewrites" / "part-0.parquet")
        stage.commit(config_hash="test", inputs=[], counts={"kept": count}, seed=0)
    return rows[:count]


def test_pairs_from_both_sources_carry_lineage_and_the_users_split(rewarded_run, tmp_path):
    config = copy_run(rewarded_run, tmp_path)
    rewrites = write_rewrites(config.run_dir)
    summary = run_pairs(config)
    pairs = pq.read_table(f"{config.run_dir}/pairs/pairs/part-0.parquet")
    check_schema(pairs, PAIRS, "pairs")
    rows = pairs.to_pylist()
    samples = pq.read_table(f"{config.run_dir}/rewards/samples").to_pylist()
    kept = {s["sample_id"]: s for s in samples if s["status"] == "kept"}
    assert kept, "the tiny run should keep some reward pairs (min_z 0)"
    splits = user_splits(config.run_dir)

    rewrite_rows = [r for r in rows if r["source"] == "rewrite"]
    assert {r["followup_id"] for r in rewrite_rows} == {r["followup_id"] for r in rewrites}
    assert all(r["sample_id"] is None and r["chosen"][0]["content"].startswith("A better answer")
               for r in rewrite_rows)
    reward_rows = [r for r in rows if r["source"] == "reward"]
    assert {r["sample_id"] for r in reward_rows} == set(kept)
    for r in reward_rows:
        sample = kept[r["sample_id"]]
        assert r["followup_id"] is None and r["prompt"] == sample["prompt"]
        assert (r["conversation_id"], r["persona_id"], r["margin"]) == (
            sample["conversation_id"], sample["persona_id"], pytest.approx(sample["margin"]))
        assert r["chosen"][0]["content"] == sample["candidates"][max(range(3), key=sample["scores"].__getitem__)]
    assert all(r["split"] == splits[r["user_id"]] for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" and r["round"] == 0 for r in rows)
    assert len({r["pair_id"] for r in rows}) == len(rows)

    assert summary["pairs"] == len(rows)
    assert sum(summary["by_source"]["rewrite"].values()) == 3
    assert summary["rewrite_labels"] == {"complaint": 2, "correction": 1}
    assert json.loads(open(f"{config.run_dir}/pairs/summary.json").read())["pairs"] == len(rows)
    manifest = json.loads(open(f"{config.run_dir}/pairs/manifest.json").read())
    assert set(manifest["upstream"]) == {"followups", "personas", "rewrites", "rewards"}


def test_pairs_load_as_a_trl_conversational_preference_dataset(rewarded_run, tmp_path):
    from datasets import Dataset
    from trl.data_utils import is_conversational

    config = copy_run(rewarded_run, tmp_path)
    write_rewrites(config.run_dir)
    run_pairs(config)
    dataset = Dataset.from_parquet(f"{config.run_dir}/pairs/pairs/part-0.parquet")
    assert {"prompt", "chosen", "rejected"} <= set(dataset.column_names)
    assert is_conversational(dataset[0])


def test_without_a_configured_rewrites_stage_there_are_zero_rewrite_pairs(rewarded_run, tmp_path):
    config = copy_run(rewarded_run, tmp_path, stages=["ingest", "followups", "personas", "rewards", "pairs"])
    write_rewrites(config.run_dir)    # left by an earlier configuration that ran the stage
    summary = run_pairs(config)
    assert summary["by_source"]["rewrite"] == {"train": 0, "eval": 0}
    assert summary["rewrites"].startswith("absent")


def test_a_configured_but_missing_rewrites_stage_is_an_error(rewarded_run, tmp_path):
    config = copy_run(rewarded_run, tmp_path)
    with pytest.raises(RuntimeError, match="run the rewrites stage first"):
        run_pairs(config)


def test_only_the_configured_train_sources_are_built(rewarded_run, tmp_path):
    config = copy_run(rewarded_run, tmp_path, train={"sources": ["rewrite"]})
    write_rewrites(config.run_dir)
    summary = run_pairs(config)
    assert summary["pairs"] == sum(summary["by_source"]["rewrite"].values()) == 3
