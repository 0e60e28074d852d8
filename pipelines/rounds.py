"""Which policy a round uses, and what its role actors ask Ray for.

Round 0 is the first pass: its rewrites, rewards, pairs and train stages write under the
run directory itself. Online round k (k >= 1) writes the same stages under
`<run_dir>/round-<k>/` (pipelines/schema.py `round_dir`), samples with the policy round
k-1 trained and trains with that policy as reference. Ingest, followups and personas exist
once, in the run directory.
"""
from __future__ import annotations

from actors.models import ModelSpec
from pipelines.config import RunConfig
from pipelines.schema import model_path

def policy_spec(config: RunConfig, round_index: int) -> ModelSpec:
    """The policy round `round_index` samples with: models.policy in round 0, else the
    model exported by the previous round's train stage (same decoding settings)."""
    if round_index == 0:
        return config.models.policy
    folder = model_path(config.run_dir, "train", round_index - 1)
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"round {round_index} samples with the policy round {round_index - 1} "
                           f"trained, but {folder} holds no exported model: run its train stage first")
    return config.models.policy.model_copy(update={"id": str(folder.resolve()), "engine": "transformers"})


def actor_gpus(*specs: ModelSpec | dict | None) -> float:
    """GPUs one role actor asks Ray for: a whole GPU when any of its models runs on one
    (a vLLM engine, or a transformers model with device cuda), else none. Without it Ray
    hides the GPUs from the actor and the engine would fail to start."""
    for spec in specs:
        if spec is None:
            continue
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
        if spec.engine == "vllm" or spec.device == "cuda":
            return 1.0
    return 0.0
