"""Per-GPU memory of a DPO training setting, estimated before any GPU is asked for.

`rlhi run --dry-run` prints this for the configured `train` section and its variants
(FSDP, precomputed reference log-probs, LoRA), so a setting that cannot fit is caught
before a cluster is paid for. The terms, per GPU:

- weights: parameters x bytes per parameter (bf16: 2, fp32: 4); FSDP shards them.
- gradients and AdamW state on the trainable parameters: gradients in the weights' dtype,
  two fp32 moments, plus an fp32 master copy under bf16 mixed precision; FSDP shards all.
- the reference model: a second copy of the weights, unless reference log-probs are
  precomputed or LoRA is used (the base model with adapters off is the reference).
- activations (Korthikanti et al. 2022, with fused attention): 34 x seq x batch x hidden
  bytes per layer in 16-bit, or 2 x seq x batch x hidden per layer with gradient
  checkpointing; DPO's batch holds chosen and rejected, so twice the pairs.
- logits: batch x seq x vocab in fp32, twice (logits and log-softmax).
- a fixed 1.5 GiB for the CUDA context, allocator slack and buffers.
It is an estimate (about +-20% against measured peaks is typical for such formulas).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import TrainConfig

GIB = 1024 ** 3
OVERHEAD_BYTES = 1.5 * GIB

# Architectures of the paper's model sizes, for ids whose config.json is not on this machine.
KNOWN_ARCHITECTURES = {
    "llama-3.1-8b": {"params": 8.03e9, "hidden": 4096, "layers": 32, "vocab": 128256},
    "llama-3.2-3b": {"params": 3.21e9, "hidden": 3072, "layers": 28, "vocab": 128256},
    "llama-3.2-1b": {"params": 1.24e9, "hidden": 2048, "layers": 16, "vocab": 128256},
    "qwen2.5-7b": {"params": 7.62e9, "hidden": 3584, "layers": 28, "vocab": 152064},
    "smollm2-135m": {"params": 1.35e8, "hidden": 576, "layers": 30, "vocab": 49152},
}


@dataclass(frozen=True)
class Architecture:
    params: float
    hidden: int
    layers: int
    vocab: int
    source: str   # where the numbers came from


def architecture(model_id: str) -> Architecture:
    """Sizes from the model's own config.json when it is on this machine, else the table."""
    from pathlib import Path

    from actors.models import resolve_model

    try:
        folder = Path(resolve_model(model_id))
    except Exception:  # noqa: BLE001 - an alias whose weights are not installed
        folder = Path("/nonexistent")
    if (folder / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        return Architecture(params, config.hidden_size, config.num_hidden_layers, config.vocab_size,
                            "config.json")
    key = model_id.lower()
    for name, sizes in KNOWN_ARCHITECTURES.items():
        if name in key:
            return Architecture(**sizes, source=f"built-in table ({name})")
    raise ValueError(f"no size known for model {model_id!r}: its config.json is not on this machine "
                     f"and it is not one of {sorted(KNOWN_ARCHITECTURES)}")


def lora_params(arch: Architecture, rank: int) -> float:
    """Adapters on the 7 linear layers of a Llama block: about r x (in + out) each."""
    return arch.layers * 7 * rank * 2 * arch.hidden * 2  # MLP layers are wider; x2 covers it


def estimate(settings: TrainConfig, arch: Architecture, *, gpus: int | None = None,
             bf16: bool = True) -> dict[str, float]:
    """GiB per GPU for each term and the total, for `settings` on `gpus` GPUs."""
    world = gpus or max(1, settings.workers)
    shard = world if settings.fsdp else 1
    width = 2 if bf16 else 4
    trainable = lora_params(arch, settings.lora.r) if settings.lora else arch.params
    sequences = 2 * settings.per_device_batch_size   # chosen and rejected
    tokens = sequences * settings.max_length
    if settings.gradient_checkpointing:
        activations = 2 * tokens * arch.hidden * arch.layers * (width / 2) + 34 * tokens * arch.hidden
    else:
        activations = 34 * tokens * arch.hidden * arch.layers * (width / 2)
    terms = {
        "weights": arch.params * width / shard,
        "gradients": trainable * width / shard,
        "optimizer": trainable * (8 + (4 if bf16 else 0)) / shard,
        "reference": 0.0 if (settings.precompute_ref_log_probs or settings.lora) else arch.params * width / shard,
        "activations": activations,
        "logits": 2 * tokens * arch.vocab * 4,
        "overhead": OVERHEAD_BYTES,
    }
    out = {name: round(value / GIB, 2) for name, value in terms.items()}
    out["total"] = round(sum(terms.values()) / GIB, 2)
    return out


def variants(settings: TrainConfig) -> list[tuple[str, TrainConfig]]:
    """The configured setting and the usual alternatives to it."""
    out = [("configured", settings)]
    flips = [("fsdp", not settings.fsdp), ("precompute_ref_log_probs", not settings.precompute_ref_log_probs),
             ("gradient_checkpointing", not settings.gradient_checkpointing)]
    for name, value in flips:
        out.append((f"{name}={value}", settings.model_copy(update={name: value})))
    if settings.lora is None:
        from pipelines.config import LoraSettings

        out.append(("lora r=16", settings.model_copy(update={"lora": LoraSettings()})))
    return out


def memory_report(settings: TrainConfig, model_id: str, gpu_gib: float | None = None,
                  bf16: bool = True) -> dict[str, Any]:
    """Estimates for each variant, with whether it fits `gpu_gib` when given."""
    arch = architecture(model_id)
    rows = []
    for name, variant in variants(settings):
        row = {"setting": name, **estimate(variant, arch, bf16=bf16)}
        if gpu_gib:
            row["fits"] = row["total"] <= gpu_gib
        rows.append(row)
    return {"model": model_id, "params_billion": round(arch.params / 1e9, 3), "sizes_from": arch.source,
            "gpus": max(1, settings.workers), "bf16": bf16, "gpu_gib": gpu_gib, "settings": rows}
