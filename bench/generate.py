"""Generation throughput of each available engine on the same prompts and model.

    python bench/generate.py --quick --json

Engines: transformers (always, in this process) and vLLM, either in this interpreter when it
has vllm or through `.venv-vllm-cpu` (`make vllm-cpu`) in a subprocess. Model: SmolLM2-135M
when converted (`make models`), else the tiny test model built in code. Greedy decoding, a
fixed token budget, one untimed warm-up call. The last stdout line is one JSON object;
ratios end in `_ratio`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VLLM_CPU_PYTHON = REPO / ".venv-vllm-cpu" / "bin" / "python"

QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that reverses a string.",
    "Give three tips for a job interview.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "How do I convert Celsius to Fahrenheit?",
    "Suggest a name for a bakery that sells only croissants.",
]


def pick_model(requested: str | None) -> str:
    """The model to benchmark: as asked, else SmolLM2 if available, else a tiny model."""
    from actors.models import SMOLLM2, ModelUnavailableError, resolve_model

    if requested:
        return requested
    try:
        resolve_model(SMOLLM2)
        return SMOLLM2
    except ModelUnavailableError:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import build_all

        return str(build_all(Path(tempfile.mkdtemp(prefix="rlhi-bench-"))).causal_lm)


def measure(engine_name: str, model: str, n_prompts: int, max_new_tokens: int) -> dict:
    """Load the engine, warm it up, then time one batched greedy generation."""
    from actors.engines import SamplingParams, make_engine
    from actors.models import ModelSpec

    prompts = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
               for i in range(n_prompts)]
    spec = ModelSpec(id=model, engine=engine_name, batch_size=n_prompts,
                     max_context_tokens=2048)
    start = time.perf_counter()
    engine = make_engine(spec)
    load_s = time.perf_counter() - start
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up, untimed
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for out in outputs for c in out)
    import torch

    return {"engine": engine_name, "torch_threads": torch.get_num_threads(),
            "load_s": round(load_s, 2), "generate_s": round(seconds, 3),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "sample": outputs[0][0].text[:80]}


def vllm_in_subprocess(model: str, args: argparse.Namespace) -> dict:
    """Run this script with `--engine vllm` in the vllm-cpu venv; parse its JSON line."""
    cmd = [str(VLLM_CPU_PYTHON), str(Path(__file__).resolve()), "--engine", "vllm",
           "--json", "--model", model, "--prompts", str(args.prompts),
           "--max-new-tokens", str(args.max_new_tokens)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    # vLLM's worker processes may still log to stdout after our line: take the last JSON one.
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith('{"model"'):
            return json.loads(line)["engines"]["vllm"]
    return {"engine": "vllm", "error": f"exit {done.returncode}: {done.stderr[-500:]}"}


def main() -> None:
    load_at_start = os.getloadavg()[0]  # other work on the box skews every number below
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts x 32 tokens")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--engine", choices=["all", "transformers", "vllm"], default="all")
    parser.add_argument("--model", help="model id, folder or alias (default: SmolLM2/tiny)")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--no-vllm", action="store_true", help="skip the vllm-cpu venv")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for transformers (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        import torch

        # On a shared box, 2 OpenMP threads beside a busy core can spin-wait each other
        # down by 10x or more; 1 thread is the honest number there. Ray workers use 1 too.
        torch.set_num_threads(args.threads)
    args.prompts = args.prompts or (8 if args.quick else 32)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 128)

    model = pick_model(args.model)
    results: dict[str, dict] = {}
    if args.engine in ("all", "transformers"):
        results["transformers"] = measure("transformers", model, args.prompts,
                                          args.max_new_tokens)
    if args.engine == "vllm" or (args.engine == "all" and not args.no_vllm):
        if util.find_spec("vllm") is not None:
            results["vllm"] = measure("vllm", model, args.prompts, args.max_new_tokens)
        elif VLLM_CPU_PYTHON.exists():
            results["vllm"] = vllm_in_subprocess(model, args)

    summary: dict[str, object] = {"model": model, "prompts": args.prompts,
                                  "max_new_tokens": args.max_new_tokens,
                                  "cpus": os.cpu_count(),
                                  "loadavg_1m_at_start": round(load_at_start, 2),
                                  "engines": results}
    for name, result in results.items():
        summary[f"{name}_tokens_per_s"] = result.get("tokens_per_s")
    if results.get("vllm", {}).get("tokens_per_s") and "transformers" in results:
        summary["vllm_over_transformers_ratio"] = round(
            results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"], 2)
    for name, result in results.items():
        print(f"{name:>12}: {result.get('tokens_per_s')} tokens/s "
              f"({result.get('generated_tokens')} tokens in {result.get('generate_s')} s)")
    print(f"load average at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f} (1 min)")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":  # vLLM spawns workers: the guard is required
    main()
