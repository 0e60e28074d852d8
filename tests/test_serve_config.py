"""Serving configuration, token handling and the Serve config YAML, without starting Ray."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_the_default_serves_the_judge_reward_on_smollm2_bound_to_localhost():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.reward.backend == "judge"
    assert cfg.models.reward.id == "smollm2-135m-instruct"
    assert cfg.serve.max_body_bytes == 1 << 20 and cfg.serve.max_candidates == 16


def test_each_app_keeps_its_batching_defaults_when_its_section_sets_something_else():
    sections = {"reward": {"num_cpus": 0}, "rewrite": {"num_cpus": 0}, "chat": {"num_cpus": 0}}
    for serve in ({}, sections):
        cfg = parse_config({"run_dir": "/tmp/x", "serve": serve}).serve
        assert (cfg.reward.max_batch_size, cfg.reward.max_ongoing_requests) == (32, 128)
        assert (cfg.rewrite.max_batch_size, cfg.chat.max_batch_size) == (4, 16)


def test_an_unknown_serve_key_is_named():
    with pytest.raises(ConfigError, match=r"serve.reward.max_batch: unknown key"):
        parse_config({"serve": {"reward": {"max_batch": 4}}})


def test_rlhi_serve_refuses_to_start_without_a_token(monkeypatch, capsys):
    monkeypatch.delenv("RLHI_API_TOKEN", raising=False)
    assert main(["serve", "--config", str(REPO / "configs" / "default.yaml")]) == 2
    assert "RLHI_API_TOKEN" in capsys.readouterr().err


def test_the_token_file_is_read_and_a_missing_one_is_named(tmp_path):
    from serve.guard import TokenError, read_token

    (tmp_path / "token").write_text("file-token-123\n")
    assert read_token(str(tmp_path / "token")) == "file-token-123"
    with pytest.raises(TokenError, match="nope"):
        read_token(str(tmp_path / "nope"))


def test_the_serve_config_yaml_points_at_a_builder_that_builds_the_app(monkeypatch):
    from ray.serve._private.utils import import_attr

    monkeypatch.setenv("RLHI_API_TOKEN", "yaml-token-123")
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    app = spec["applications"][0]
    assert spec["http_options"]["host"] == "127.0.0.1"
    builder = import_attr(app["import_path"])
    gateway = builder(app["args"])._bound_deployment  # deployments bound, nothing started
    bound = [getattr(getattr(arg, "_bound_deployment", None), "name", None) for arg in gateway.init_args]
    assert gateway.name == "gateway" and bound[:3] == ["reward", "rewrite", "chat"]


def test_the_chat_log_is_off_by_default_and_its_keys_are_checked():
    log = load_config(REPO / "configs" / "default.yaml").serve.chat.log
    assert (log.enabled, log.folder, log.max_batch_conversations, log.max_batch_seconds) == (
        False, "logs/chat", 256, 60.0)
    with pytest.raises(ConfigError, match=r"serve.chat.log.max_batch_seconds = 0: Input should be greater"):
        parse_config({"serve": {"chat": {"log": {"max_batch_seconds": 0}}}})
    with pytest.raises(ConfigError, match=r'serve.chat.log.redact = \["names"\]: Value error, unknown redaction'):
        parse_config({"serve": {"chat": {"log": {"redact": ["names"]}}}})


def deployment_versions(config) -> dict[str, str]:
    """Each deployment's version in the application `rlhi serve` would run (nothing started)."""
    from serve.app import build_app

    gateway = build_app(config, "digest")._bound_deployment
    bound = [arg._bound_deployment for arg in gateway.init_args if hasattr(arg, "_bound_deployment")]
    return {d.name: d.version for d in [gateway, *bound]}


def test_a_reward_or_rewrite_model_retrained_into_the_same_folder_is_replaced_on_redeploy(tmp_path, tiny_models):
    reward, rewriter = tmp_path / "reward", tmp_path / "rewriter"
    shutil.copytree(tiny_models.encoder_reward, reward)
    shutil.copytree(tiny_models.causal_lm, rewriter)
    config = parse_config({"serve": {"reward": {"backend": "trained"}, "chat": {"enabled": False}},
                           "models": {"reward": {"id": str(reward)}, "rewriter": {"id": str(rewriter)}}})
    first = deployment_versions(config)
    assert set(first) == {"gateway", "reward", "rewrite"} and deployment_versions(config) == first

    def retrain(folder: Path) -> None:   # new weights in the same files, written a second later
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes())
        stat = weights.stat()
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    retrain(reward)
    second = deployment_versions(config)
    assert [name for name in first if first[name] != second[name]] == ["reward"]
    retrain(rewriter)
    third = deployment_versions(config)
    assert [name for name in first if second[name] != third[name]] == ["rewrite"]


def test_ctrl_c_interrupts_a_server_still_starting_and_stops_one_serving_gracefully():
    import signal
    import threading

    from serve.run import stop_handler

    stop, serving = threading.Event(), threading.Event()
    handle = stop_handler(stop, serving)
    with pytest.raises(KeyboardInterrupt, match="stopped while starting"):
        handle(signal.SIGINT, None)          # models still loading: the start is abandoned at once
    assert stop.is_set()
    stop.clear()
    serving.set()
    handle(signal.SIGTERM, None)            # serving: it returns, the server closes the chat log and stops
    assert stop.is_set()
