"""The simulated-user experiment: statistics, arm bookkeeping, and the quick run's effect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config import parse_config
from sim.experiment import ABLATIONS, ARMS, QUICK, pair_quality, pipeline_config, summarize


def test_summary_reports_every_arm_and_every_difference():
    scores = {arm: {f"u{i}": (i % 3) / 3 for i in range(6)} for arm in ARMS}
    scores["rlhi"] = {u: s + 0.1 for u, s in scores["rlhi"].items()}
    result = summarize(scores, seed=0)
    assert set(result["arms"]) == set(ARMS)
    for key in ("rlhi_minus_base", "persona_minus_agnostic", "rlhi_minus_base_persona"):
        assert set(result[key]) == {"mean", "ci_low", "ci_high"}
        assert result[key]["mean"] == pytest.approx(0.1)
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
    assert pair_quality(tmp_path, tmp_path / "profiles.jsonl") == {
        "reward": {"pairs": 2, "chosen_minus_rejected": -0.5, "better": 0, "worse": 1},
        "rewrite": {"pairs": 1, "chosen_minus_rejected": 1.0, "better": 1, "worse": 0}}


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_every_pipeline_variant_reads_only_the_logs(variant, tmp_path):
    logs = tmp_path / "sim" / "logs"
    config = parse_config(pipeline_config(tmp_path / "run", logs, "model-folder", QUICK, 0, ABLATIONS[variant]))
    assert [Path(p) for p in config.ingest.inputs] == [logs]
    dumped = json.dumps(config.model_dump(mode="json"))
    assert "profiles.jsonl" not in dumped and "followup_labels" not in dumped


def test_ablations_differ_from_rlhi_only_in_their_switch(tmp_path):
    configs = {name: parse_config(pipeline_config(tmp_path, tmp_path / "logs", "m", QUICK, 0, ab))
               for name, ab in ABLATIONS.items()}
    assert configs["user_agnostic"].ablation.user_agnostic and not configs["rlhi"].ablation.user_agnostic
    assert configs["from_scratch"].ablation.rewrites_from_scratch
    for name in ("user_agnostic", "from_scratch"):
        assert configs[name].model_dump(exclude={"ablation"}) == configs["rlhi"].model_dump(exclude={"ablation"})


@pytest.mark.experiment   # ~8 minutes on 2 cores (plus ~12 to build the warm-start once): make experiment
@pytest.mark.slow
def test_quick_experiment_rlhi_beats_base(ray_session, tmp_path):
    from sim.experiment import run_experiment

    result = run_experiment(quick=True, seed=0, out=tmp_path / "exp", log=lambda s: None)
    assert set(result["arms"]) == set(ARMS)
    assert (tmp_path / "exp" / "results.png").is_file() and (tmp_path / "exp" / "results.md").is_file()
    assert set(result["roles"]) == {"n", "policy", "rewriter", "persona"}
    assert result["pairs"]["rewrite"]["chosen_minus_rejected"] > 0, result["pairs"]
    assert result["rlhi_minus_base"]["ci_low"] > 0, result
