"""The simulated-user experiment: arm bookkeeping, the decomposition's measures, and the
quick run's effect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import parse_config
from sim.decompose import pair_quality
from sim.experiment import ARMS, ORACLE_ARMS, QUICK, VARIANTS, pipeline_config
from sim.results import summarize


def test_summary_reports_every_arm_and_every_difference():
    scores = {arm: {f"u{i}": (i % 3) / 3 for i in range(6)} for arm in ARMS + ORACLE_ARMS}
    scores["rlhi"] = {u: s + 0.1 for u, s in scores["rlhi"].items()}
    result = summarize(scores, seed=0)
    assert set(result["arms"]) == set(ARMS + ORACLE_ARMS)
    for key in ("rlhi_minus_base", "persona_minus_agnostic", "rlhi_minus_base_persona", "rlhi_minus_sft"):
        assert set(result[key]) == {"mean", "ci_low", "ci_high"}
        assert result[key]["mean"] == pytest.approx(0.1)
    assert result["rewards_only_minus_base_persona"]["mean"] == 0.0
    assert "oracle_pairs_minus_base_persona" in result
    json.dumps(result)


def test_pair_quality_scores_each_train_pair_with_its_users_hidden_profile(tmp_path):
    import random
    from dataclasses import asdict

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.schema import PAIRS
    from sim.answers import write_answer
    from sim.profiles import PROPERTIES, sample_profile

    rng = random.Random(0)
    profile = sample_profile(rng, 0, "u1")
    (tmp_path / "profiles.jsonl").write_text(json.dumps(asdict(profile)) + "\n")
    liked = {p: profile.preferences.get(p, values[0]) for p, values in PROPERTIES.items()}
    disliked = liked | {p: next(v for v in PROPERTIES[p] if v != want) for p, want in profile.preferences.items()}
    good, bad = (write_answer("cooking", v, rng) for v in (liked, disliked))

    def pair(chosen, rejected, split="train", source="rewrite"):
        return {"chosen": [{"role": "assistant", "content": chosen}], "user_id": "u1", "split": split,
                "rejected": [{"role": "assistant", "content": rejected}], "source": source}

    rows = [pair(good, bad), pair(bad, good, source="reward"), pair(good, good, source="reward"),
            pair(bad, good, split="eval")]
    (tmp_path / "pairs").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), tmp_path / "pairs" / "pairs")
    assert pair_quality(tmp_path, {"u1": profile}) == {
        "reward": {"pairs": 2, "chosen_minus_rejected": -0.5, "better": 0, "worse": 1},
        "rewrite": {"pairs": 1, "chosen_minus_rejected": 1.0, "better": 1, "worse": 0}}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pipeline_variant_reads_only_the_logs(variant, tmp_path):
    logs = tmp_path / "sim" / "logs"
    config = parse_config(pipeline_config(tmp_path / "run", logs, "model-folder", QUICK, 0, *VARIANTS[variant]))
    assert [Path(p) for p in config.ingest.inputs] == [logs]
    dumped = json.dumps(config.model_dump(mode="json"))
    assert "profiles.jsonl" not in dumped and "followup_labels" not in dumped


def test_variants_differ_from_rlhi_only_in_their_switch(tmp_path):
    configs = {name: parse_config(pipeline_config(tmp_path, tmp_path / "logs", "m", QUICK, 0, *variant))
               for name, variant in VARIANTS.items()}
    assert configs["user_agnostic"].ablation.user_agnostic and not configs["rlhi"].ablation.user_agnostic
    assert configs["from_scratch"].ablation.rewrites_from_scratch
    for name in ("user_agnostic", "from_scratch"):
        assert configs[name].model_dump(exclude={"ablation"}) == configs["rlhi"].model_dump(exclude={"ablation"})
    assert configs["rlhi"].train.sources == ["rewrite", "reward"] and configs["rewards_only"].train.sources == ["reward"]
    assert configs["rewards_only"].model_dump(exclude={"train"}) == configs["rlhi"].model_dump(exclude={"train"})
    # the reward model is trained on the run's own rewrites and scores the user-based rewards
    assert configs["rlhi"].stages.index("reward_model") < configs["rlhi"].stages.index("rewards")
    assert configs["rlhi"].rewards.backend == "trained"


@pytest.mark.experiment   # the quick run on 2 cores (plus the warm-start build once): make experiment
@pytest.mark.slow
def test_quick_experiment_persona_dpo_adds_to_persona_guided_inference(ray_session, tmp_path):
    """RLHI's claim, on the evaluation phrasings with the persona leak fixed: training on the
    conversations adds to what handing the base policy the persona gives."""
    from sim.experiment import run_experiment

    result = run_experiment(quick=True, seed=0, out=tmp_path / "exp", log=lambda s: None)
    assert result["family"] == "eval" and set(result["arms"]) == set(ARMS)
    assert (tmp_path / "exp" / "results.png").is_file() and (tmp_path / "exp" / "results.md").is_file()
    assert result["rlhi_minus_base"]["ci_low"] > 0, result["rlhi_minus_base"]
    assert result["rlhi_minus_base_persona"]["ci_low"] > 0, result["rlhi_minus_base_persona"]


# --- the decomposition's measures, on hand-made tables -------------------------------------

def test_a_personas_stated_values_map_back_to_the_simulators_properties():
    from sim.decompose import oracle_persona, persona_values
    from sim.profiles import Profile

    profile = Profile(0, "u1", {"length": "short", "example": "no_example"}, {}, 0.5, {}, 0.5, 1)
    persona = oracle_persona(profile)
    assert persona == "Stated preferences: does not want examples; prefers shorter answers"
    assert persona_values(persona + "\nLanguages: English (2)") == {"example": "no_example", "length": "short"}
    assert persona_values("Languages: English (2)") == {}


def test_the_extractor_is_scored_on_both_families():
    from sim.decompose import extractor_accuracy

    scores = extractor_accuracy(n=40)
    assert set(scores) == {"dev", "eval"} and scores["dev"]["simulated"] == 40
    assert scores["dev"]["simulated_feedback_exact"] >= 0.95  # the family it was written against


def write_samples(folder, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.schema import SAMPLES, USERS

    (folder / "rewards" / "samples").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), folder / "rewards" / "samples" / "part-0.parquet")
    (folder / "personas" / "users").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"user_id": "u-train", "split": "train"}, {"user_id": "u-eval", "split": "eval"}],
                                        schema=USERS), folder / "personas" / "users" / "part-0.parquet")


SHORT, LONG = "Rice needs water.", " ".join(["Rice needs water and time to cook well."] * 15)


def test_reward_model_agreement_counts_held_out_candidate_pairs_the_checker_tells_apart(tmp_path):
    from sim.decompose import reward_model_agreement
    from sim.profiles import Profile

    wants_short = Profile(0, "u-eval", {"length": "short"}, {}, 0.5, {}, 0.5, 1)
    write_samples(tmp_path, [
        {"sample_id": "s1", "user_id": "u-eval", "candidates": [SHORT, LONG, SHORT], "scores": [0.9, 0.1, 0.2]},
        {"sample_id": "s2", "user_id": "u-eval", "candidates": [SHORT, LONG], "scores": [0.1, 0.9]},
        {"sample_id": "s3", "user_id": "u-train", "candidates": [SHORT, LONG], "scores": [0.1, 0.9]}])
    # s1: (0,1) agrees, (1,2) agrees, (0,2) the checker ties; s2: disagrees; s3: a training user
    assert reward_model_agreement(tmp_path, {"u-eval": wants_short}) == {"candidate_pairs": 3, "agreement": 0.6667}


def test_oracle_pairs_are_the_checkers_best_against_worst_of_training_users_samples(tmp_path):
    from sim.decompose import oracle_pairs
    from sim.profiles import Profile

    profiles = {u: Profile(0, u, {"length": "long"}, {}, 0.5, {}, 0.5, 1) for u in ("u-train", "u-eval")}
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "How do I cook rice?"}]
    write_samples(tmp_path, [
        {"sample_id": "s1", "user_id": "u-train", "candidates": [SHORT, LONG], "scores": [0.9, 0.1], "prompt": prompt},
        {"sample_id": "s2", "user_id": "u-train", "candidates": [SHORT, SHORT + " "], "scores": [0.9, 0.1], "prompt": prompt},
        {"sample_id": "s3", "user_id": "u-eval", "candidates": [SHORT, LONG], "scores": [0.9, 0.1], "prompt": prompt}])
    [pair] = oracle_pairs(tmp_path, profiles)
    assert (pair["sample_id"], pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("s1", LONG, SHORT)
    assert pair["split"] == "train" and pair["prompt"] == prompt
