"""The rewrites and rewards stages with their rewriter / reward model behind `rlhi serve`,
and the chat endpoint's persona lookup and sampling.

A real Serve application on 127.0.0.1 (tiny models, real HTTP, a token file) is shared by
the module and shut down at its end.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import requests

import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from tests.conftest import free_port

TOKEN = "stage-token-0123456789"
CONTEXTS = [[{"role": "user", "content": "Write a short story about a robot."}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "Another one?"}],
            [{"role": "user", "content": "What is 2 + 2?"}]]
PERSONAS = ["Likes concise answers about robots.", None, ""]


def _tiny(tiny_models, **fields) -> dict:
    return {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_new_tokens": 8, **fields}


@pytest.fixture(scope="module")
def served(ray_session, tiny_models, tmp_path_factory):
    """(config dict of the running server, its models); Serve is shut down afterwards."""
    from ray import serve

    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient
    from serve.guard import token_digest

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    app_cfg = {"num_cpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    tiny = _tiny(tiny_models)
    # As in tests/test_rewards.py: the reward judge on a short window.
    sections = {"models": {"reward": _tiny(tiny_models, max_context_tokens=512), "rewriter": tiny,
                           "policy": tiny, "judge": tiny},
                "serve": {"port": free_port(), "token_file": str(token_file), "max_tokens": 8,
                          "request_timeout_s": 60, "reward": app_cfg, "rewrite": app_cfg,
                          "chat": {**app_cfg, "log": {"enabled": False}}},
                "resources": {"progress_bars": False}}
    run_dir = tmp_path_factory.mktemp("serving")
    _serving_personas(run_dir, {hashlib.sha256(b"alice@example.com").hexdigest(): "Likes short answers."})
    config = parse_config({"run_dir": str(run_dir), **sections})
    serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port})
    serve.run(build_app(config, token_digest(TOKEN)), name=APP_NAME, route_prefix="/")
    RLHIClient(f"http://127.0.0.1:{config.serve.port}", TOKEN).wait_healthy(timeout_s=60)
    yield sections
    serve.shutdown()


def _serving_personas(run_dir, personas: dict[str, str]) -> None:
    """A finished personas stage holding one serving persona per user id."""
    from datetime import datetime, timezone

    import pyarrow as pa

    from pipelines.contract import StageWriter
    from pipelines.schema import PERSONAS

    rows = [{"persona_id": f"p-{user[:8]}", "user_id": user, "as_of": datetime(2024, 1, 1, tzinfo=timezone.utc),
             "conversations_before": 1, "persona": text, "history_conversations": 1, "history_tokens": 5,
             "redactions": 0, "backend": "extractive", "serving": True} for user, text in personas.items()]
    with StageWriter(run_dir, "personas") as stage:
        (stage.tmp / "personas").mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=PERSONAS), stage.tmp / "personas" / "part-0.parquet")
        stage.commit(config_hash="hand-made", inputs=[], counts={}, seed=0)


def _stage_config(sections, run_dir, **stage):
    return parse_config({"run_dir": str(run_dir), **sections, **stage})


def _copy_run(pipeline_run, tmp_path, name="run"):
    source, _ = pipeline_run
    shutil.copytree(source, tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- the adapters

def test_served_reward_model_gives_the_local_scores_in_order(served, tiny_models, tmp_path):
    from actors.reward_model import RewardModel
    from serve.roles import ServedRewardModel, connect

    candidates = [["Once upon a time.", "No."], ["Red.", "Green.", "I cannot."], ["4"]]
    endpoint = connect(_stage_config(served, tmp_path))

    remote = ServedRewardModel(endpoint).score_batch(PERSONAS, CONTEXTS, candidates)
    local = RewardModel("judge", served["models"]["reward"]).score_batch(PERSONAS, CONTEXTS, candidates)

    assert [len(s) for s in remote] == [2, 3, 1]
    for got, want in zip(remote, local):
        assert got == pytest.approx(want, abs=1e-4)


def test_served_rewriter_returns_one_rewrite_per_answer_in_order(served, tiny_models, tmp_path):
    from actors.rewriter import Rewrite, Rewriter
    from serve.roles import ServedRewriter, connect

    answers, feedback = ["A robot.", "Blue.", "5"], ["Longer please.", "Not blue.", "Wrong."]
    endpoint = connect(_stage_config(served, tmp_path))

    remote = ServedRewriter(endpoint).rewrite_batch(PERSONAS, CONTEXTS, answers, feedback)
    local = Rewriter(_tiny(tiny_models))
    one_by_one = [local.rewrite(p, c, a, f) for p, c, a, f in zip(PERSONAS, CONTEXTS, answers, feedback)]

    assert all(isinstance(r, Rewrite) for r in remote) and len(remote) == 3
    assert [r.text for r in remote] == [r.text for r in one_by_one]


def test_turns_longer_than_the_server_takes_are_cut_not_refused(served, tmp_path):
    """Ingest keeps conversations of up to 200,000 characters, the server refuses texts over
    serve.max_chars (100,000): the served roles cut them in the middle, as the local roles
    would to fit their window, instead of failing the stage with a 422."""
    from serve.roles import ServedRewardModel, ServedRewriter, connect

    endpoint = connect(_stage_config(served, tmp_path))
    context = [[{"role": "user", "content": "Summarise this: " + "word " * 30_000}]]   # 150,016 characters
    assert len(ServedRewardModel(endpoint).score_batch([""], context, [["Fine.", "x" * 120_000]])[0]) == 2
    [rewrite] = ServedRewriter(endpoint).rewrite_batch([""], context, ["y" * 120_000], ["Shorter " * 15_000])
    assert rewrite.context_truncated == 1   # nothing to drop, and the texts clipped to the window


# ---------------------------------------------------------------- the stages

def test_run_rewards_scores_through_the_served_app(served, pipeline_run, tmp_path):
    from pipelines.stages.rewards import run_rewards

    stage = {"rewards": {"n": 2, "max_prompts": 4, "batch_size": 2, "workers": 1}}
    via_serve = _stage_config(served, _copy_run(pipeline_run, tmp_path, "serve"),
                              rewards={**stage["rewards"], "reward_via": "serve"})
    in_pool = _stage_config(served, _copy_run(pipeline_run, tmp_path, "pool"), **stage)

    summary = run_rewards(via_serve)
    run_rewards(in_pool)

    port = served["serve"]["port"]
    assert summary["reward_via"] == "serve"
    assert summary["served"] == {"url": f"http://127.0.0.1:{port}", "backend": "judge",
                                 "model": served["models"]["reward"]["id"]}
    manifest = json.loads((tmp_path / "serve" / "rewards" / "manifest.json").read_text())
    assert manifest["counts"]["served"] == summary["served"]
    by_serve, by_pool = ({r["sample_id"]: r for r in pq.read_table(tmp_path / name / "rewards" / "samples").to_pylist()
                          if r["reason"] != "over_cap"} for name in ("serve", "pool"))
    assert len(by_serve) == 4 and by_serve.keys() == by_pool.keys()
    for sample, row in by_serve.items():
        assert row["candidates"] == by_pool[sample]["candidates"]   # the policy stayed in the pool
        assert row["scores"] == pytest.approx(by_pool[sample]["scores"], abs=1e-4)


def test_run_rewrites_rewrites_through_the_served_app(served, pipeline_run, tmp_path):
    from pipelines.stages.rewrites.stage import run_rewrites

    run_dir = _copy_run(pipeline_run, tmp_path)
    config = _stage_config(served, run_dir, rewrites={"batch_size": 2, "workers": 1, "max_followups": 2,
                                                      "rewriter_via": "serve"})

    summary = run_rewrites(config)

    assert summary["rewriter_via"] == "serve"
    assert summary["serve_url"] == f"http://127.0.0.1:{served['serve']['port']}"
    rows = pq.read_table(run_dir / "rewrites" / "rewrites").to_pylist()
    done = [r for r in rows if r["reason"] not in ("over_cap", "no_user_turn")]
    assert len(done) == 2 and all(r["chosen"] is not None for r in done)
    assert summary["kept"] + sum(summary["filtered"].values()) == len(rows)


# ---------------------------------------------------------------- no server

@pytest.mark.parametrize("stage", ["rewards", "rewrites"])
def test_no_server_is_a_clear_error_before_ray_data_starts(stage, pipeline_run, tmp_path, monkeypatch):
    from pipelines.stages import rewards
    from pipelines.stages.rewrites import stage as rewrites
    from serve.roles import ServeUnavailableError

    def must_not_run(*args, **kwargs):
        raise AssertionError("Ray Data started without a server")

    monkeypatch.setattr(rewards, "score_with_ray", must_not_run)
    monkeypatch.setattr(rewrites, "rewrite_with_ray", must_not_run)
    monkeypatch.setenv("RLHI_API_TOKEN", TOKEN)
    port = free_port()
    setting = {"rewards": {"reward_via": "serve"}, "rewrites": {"rewriter_via": "serve"}}[stage]
    config = parse_config({"run_dir": str(_copy_run(pipeline_run, tmp_path)), "serve": {"port": port},
                           stage: setting})
    run = rewards.run_rewards if stage == "rewards" else rewrites.run_rewrites

    with pytest.raises(ServeUnavailableError, match=rf"http://127\.0\.0\.1:{port}.*rlhi serve --config"):
        run(config)


# ---------------------------------------------------------------- the chat endpoint

def _chat(served, **body):
    reply = requests.post(f"http://127.0.0.1:{served['serve']['port']}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"messages": [{"role": "user", "content": "Tell me about the sea."}], **body})
    reply.raise_for_status()
    return reply.json()


def test_chat_finds_the_persona_by_the_id_ingest_made_of_the_users_key(served):
    # Tables key a user by the SHA-256 of a key that is not a hash (pipelines/schema.py pseudonym).
    assert _chat(served, user="alice@example.com")["persona_id"] == f"p-{hashlib.sha256(b'alice@example.com').hexdigest()[:8]}"
    assert _chat(served, user="bob")["persona_id"] is None


def test_chat_without_a_seed_samples_afresh_and_a_seed_repeats(served):
    unseeded = {_chat(served, temperature=1.0)["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(unseeded) > 1        # "regenerate" gives another answer (it drew seed 0 every time)
    seeded = [_chat(served, temperature=1.0, seed=7)["choices"][0]["message"]["content"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_a_persona_too_long_for_the_window_fails_its_own_request_not_its_batch(served):
    """The reward judge has a 512-token window here: a 20,000-character persona cannot fit.
    That request is a 422 saying so; the requests batched beside it are answered."""
    from concurrent.futures import ThreadPoolExecutor

    base, headers = f"http://127.0.0.1:{served['serve']['port']}", {"Authorization": f"Bearer {TOKEN}"}
    long_persona = "Likes detail. " * 1500
    messages = [{"role": "user", "content": "Name a colour."}]
    bodies = [("score", {"persona": long_persona, "messages": messages, "candidates": ["Blue."]}),
              ("rewrite", {"persona": long_persona * 4, "messages": messages, "answer": "Blue.", "feedback": "Shorter."})]
    bodies += [("score", {"persona": "", "messages": messages, "candidates": ["Blue.", "Red."]})] * 3
    bodies += [("rewrite", {"persona": "", "messages": messages, "answer": "Blue.", "feedback": "Shorter."})] * 3
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: requests.post(f"{base}/v1/{b[0]}", json=b[1], headers=headers, timeout=120),
                                bodies))
    assert [r.status_code for r in replies] == [422, 422] + [200] * 6
    assert "do not fit the model's context window" in replies[0].json()["error"]
    assert [len(r.json()["scores"]) for r in replies[2:5]] == [2, 2, 2]
