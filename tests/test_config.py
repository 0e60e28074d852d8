"""The run configuration: validated at load, errors name the key, the value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import ConfigError, RunConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "paper-8b.yaml"])
def test_shipped_configs_validate(name):
    assert isinstance(load_config(REPO / "configs" / name), RunConfig)


def test_the_default_config_matches_the_built_in_defaults_where_it_is_silent():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.ingest.filters == RunConfig().ingest.filters


def test_an_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        parse_config({"ingest": {"filters": {"drop_toxc": True}}}, "my.yaml")
    message = str(err.value)
    assert "my.yaml" in message and "ingest.filters.drop_toxc" in message
    assert "drop_toxic" in message  # what is allowed


def test_a_bad_value_is_named_with_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        parse_config({"ingest": {"user_key": "cookie"}})
    message = str(err.value)
    assert "ingest.user_key" in message and '"cookie"' in message and "hashed_ip+user_agent" in message


def test_a_negative_limit_is_refused():
    with pytest.raises(ConfigError, match=r"ingest.filters.max_chars = -5"):
        parse_config({"ingest": {"filters": {"max_chars": -5}}})


def test_a_missing_config_file_says_what_to_try(tmp_path):
    with pytest.raises(ConfigError, match="configs/default.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)


def test_a_stage_settings_hash_changes_with_its_own_settings_only():
    from pipelines.registry import settings_hash

    base = parse_config({})
    ingest_changed = parse_config({"ingest": {"filters": {"max_chars": 1000}}})
    policy_changed = parse_config({"models": {"policy": {"temperature": 0.9}}})
    assert settings_hash(base, "ingest") == settings_hash(parse_config({}), "ingest")
    assert settings_hash(base, "ingest") != settings_hash(ingest_changed, "ingest")
    assert settings_hash(base, "followups") == settings_hash(ingest_changed, "followups")
    # models.policy is a train setting, not a followups one
    assert settings_hash(base, "train") != settings_hash(policy_changed, "train")
    assert settings_hash(base, "followups") == settings_hash(policy_changed, "followups")


def test_lora_with_fsdp_is_refused_naming_both_settings():
    with pytest.raises(ConfigError, match="train.lora with train.fsdp is not supported"):
        parse_config({"train": {"fsdp": True, "lora": {"r": 8}}})
    assert parse_config({"train": {"fsdp": True}}).train.fsdp


def test_stages_out_of_pipeline_order_or_twice_are_refused_with_the_order_to_use():
    with pytest.raises(ConfigError, match=r"online.stages must list its stages in pipeline order: \['rewards', 'pairs', 'train'\]"):
        parse_config({"online": {"stages": ["train", "pairs", "rewards"]}})
    with pytest.raises(ConfigError, match=r"stages must list its stages in pipeline order: \['ingest', 'pairs', 'train'\]"):
        parse_config({"stages": ["train", "pairs", "ingest"]})
    with pytest.raises(ConfigError, match="lists a stage twice"):
        parse_config({"stages": ["ingest", "ingest"]})


def test_the_run_seed_reaches_every_model_that_sets_none_itself():
    from pipelines.config import parse_config
    config = parse_config({"run_dir": "/tmp/x", "seed": 3, "models": {"judge": {"id": "a", "seed": 9}}})
    seeds = {role: getattr(config.models, role).seed for role in type(config.models).model_fields}
    assert seeds == {"classifier": 3, "persona": 3, "policy": 3, "rewriter": 3, "judge": 9, "reward": 3}
