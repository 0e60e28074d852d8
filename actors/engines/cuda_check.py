"""Check the transformers engine and the reward scorer on one CUDA GPU in bfloat16.

    python -m actors.engines.cuda_check [--json]

For a lent GPU machine (no vLLM, no Ray there): builds the tiny test models on the device,
then checks that `auto` resolves to transformers without vLLM, that the model lands on CUDA
in bf16, that batched greedy generation matches one-by-one generation, that label scores
agree with the float32 CPU engine, and that a classifier reward model scores on CUDA.
Prints one JSON line last; exits non-zero when a check fails. On a machine without CUDA it
says so and exits 2.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Write a Python function that reverses a string."}]]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False}))
        return 2
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_all

    from actors.engines import SamplingParams, pick_engine
    from actors.engines.transformers_engine import TransformersEngine
    from actors.models import ModelSpec
    from actors.reward_model import RewardModel

    tiny = build_all(Path(tempfile.mkdtemp(prefix="rlhi-cuda-")))
    report: dict[str, object] = {"device": torch.cuda.get_device_name(0),
                                 "torch": torch.__version__}
    checks: dict[str, bool] = {}
    spec = ModelSpec(id=str(tiny.causal_lm), batch_size=8)
    checks["auto_is_transformers_without_vllm"] = pick_engine(spec) == "transformers"

    gpu = TransformersEngine(spec)
    param = next(gpu.model.parameters())
    report["dtype"] = str(param.dtype)
    checks["on_cuda_in_bf16"] = param.is_cuda and param.dtype == torch.bfloat16

    greedy = SamplingParams(max_new_tokens=16)
    batched = [c[0].text for c in gpu.generate(PROMPTS, greedy)]
    single = [gpu.generate([p], greedy)[0][0].text for p in PROMPTS]
    # bf16 kernels may round differently at another batch shape: report, do not fail on it.
    report["batched_equals_single"] = batched == single
    sampled = gpu.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.6,
                                                   top_p=0.9, n=4, seed=3))
    checks["n_samples"] = [len(s) for s in sampled] == [4, 4, 4]

    labels = [["Paris", "Rome", "Berlin"]] * len(PROMPTS)
    gpu_scores = gpu.score_continuations(PROMPTS, labels)
    cpu = TransformersEngine(ModelSpec(id=str(tiny.causal_lm), device="cpu"))
    cpu_scores = cpu.score_continuations(PROMPTS, labels)
    worst = max(abs(a - b) for g, c in zip(gpu_scores, cpu_scores) for a, b in zip(g, c))
    report["max_score_gap_bf16_vs_fp32"] = round(worst, 4)
    checks["scores_match_fp32_cpu"] = worst < 0.25

    rm = RewardModel("classifier", ModelSpec(id=str(tiny.reward_model)))
    rewards = rm.score("Likes short answers.", PROMPTS[0], ["Paris.", "Rome.", "Lyon."])
    checks["reward_classifier_on_cuda"] = (len(rewards) == 3 and
                                           next(rm.scorer.model.parameters()).is_cuda)

    prompts = [PROMPTS[i % 3] for i in range(32)]
    start = time.perf_counter()
    outs = gpu.generate(prompts, SamplingParams(max_new_tokens=64))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report["tiny_tokens_per_s"] = round(sum(c[0].num_tokens for c in outs) / seconds, 1)
    report["checks"] = checks
    print(json.dumps(report))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
