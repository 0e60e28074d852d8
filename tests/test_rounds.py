"""Which policy and engine each round runs with (pipelines/rounds.py), without Ray."""
from __future__ import annotations


def test_a_trained_policy_runs_on_the_engine_the_policy_ran_on():
    from pipelines.config import parse_config
    from pipelines.rounds import actor_gpus, trained_policy

    def policy(**spec):
        return parse_config({"run_dir": "/tmp/x", "models": {"policy": {"id": "meta-llama/Llama-3.1-8B-Instruct",
                                                                          **spec}}})
    on_vllm = trained_policy(policy(engine="vllm", max_new_tokens=1024), "/tmp/x/train/model")
    assert (on_vllm.engine, on_vllm.id, on_vllm.max_new_tokens) == ("vllm", "/tmp/x/train/model", 1024)
    assert actor_gpus(on_vllm) == 1.0   # so the next round's actors get a GPU for it
    over_http = trained_policy(policy(engine="openai", base_url="http://127.0.0.1:8000/v1"), "/tmp/x/train/model")
    assert over_http.engine == "auto"   # the server holds the old weights, not the new ones
