"""The arms of the simulated-user experiment and how each is evaluated.

An arm is a policy folder and the persona it answers with (none, the pipeline's, the
oracle's). Evaluation asks held-out users new requests, lets the arm answer through the
same PolicySampler the pipeline samples with (base system prompt + persona block +
request), and scores every answer with the checker against the user's hidden profile. Only
this scoring (and the oracle arm's persona) reads the profile: the other arms see the
persona text the pipeline built from the user's logged history.

Intervals (pipelines/bootstrap.py) are over held-out users, the unit that varies;
differences between arms are paired, resampling the same users for both arms.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from sim.profiles import Profile, check_answer
from sim.requests import make_request



@dataclass(frozen=True)
class Arm:
    """One policy under evaluation. `run_dir` is the pipeline run it came from, if any."""

    name: str
    model: str               # a model folder
    persona: str             # what it answers with: "none", "pipeline" (the user's serving
    run_dir: str | None = None  # persona, built from logs) or "oracle" (the hidden profile)


@dataclass(frozen=True)
class EvalUser:
    """A held-out user: their persona (from logs) and, for the checker only, their profile."""

    user_id: str
    persona: str
    profile: Profile


# --- evaluation ---------------------------------------------------------------------------

def heldout_requests(user: EvalUser, k: int, seed: int) -> list[str]:
    """`k` new requests of this user, drawn from their topic mix with a seed of their own
    (a different stream from the simulation's, so none repeats a logged conversation by design)."""
    rng = random.Random(f"{seed}/heldout/{user.profile.hashed_ip}")
    topics = sorted(user.profile.topics)
    weights = [user.profile.topics[t] for t in topics]
    return [make_request(rng.choices(topics, weights=weights)[0], rng) for _ in range(k)]


def evaluate_arm(arm: Arm, users: Sequence[EvalUser], *, requests_per_user: int, samples: int,
                 seed: int, max_new_tokens: int, log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """user_id -> mean checker score of the arm's answers to that user's held-out requests."""
    from actors.models import ModelSpec
    from actors.policy_sampler import PolicySampler

    spec = ModelSpec(id=arm.model, engine="transformers", max_new_tokens=max_new_tokens,
                     seed=seed, batch_size=64)
    sampler = PolicySampler(spec, samples)
    personas, contexts, owners = [], [], []
    from sim.decompose import oracle_persona

    persona_of = {"none": lambda u: None, "pipeline": lambda u: u.persona or None,
                  "oracle": lambda u: oracle_persona(u.profile) or None}[arm.persona]
    for user in users:
        for request in heldout_requests(user, requests_per_user, seed):
            personas.append(persona_of(user))
            contexts.append([{"role": "user", "content": request}])
            owners.append(user)
    out = sampler.sample_batch(personas, contexts)
    scores: dict[str, list[float]] = {}
    for user, sampled in zip(owners, out):
        for answer in sampled.candidates:
            scores.setdefault(user.user_id, []).append(check_answer(user.profile.preferences, answer).score)
    per_user = {u: sum(s) / len(s) for u, s in scores.items()}
    log(f"arm {arm.name}: mean {sum(per_user.values()) / len(per_user):.3f} over {len(per_user)} users")
    return per_user


# --- the SFT arm --------------------------------------------------------------------------

def sft_rows(rewrites, train_users: set[str]) -> list[dict]:
    """Conversational prompt-completion rows from the rewrites stage's kept pairs of train
    users: the DPO prompt (system + persona + context) and the rewrite as the completion."""
    rows = []
    for row in rewrites.to_pylist():
        if row["status"] == "kept" and row["chosen"] and row["user_id"] in train_users:
            rows.append({"prompt": list(row["prompt"]),
                         "completion": [{"role": "assistant", "content": row["chosen"]}]})
    return rows


def train_sft(base_model: str, rows: list[dict], out: Path, *, max_steps: int, learning_rate: float,
              batch_size: int, seed: int) -> Path:
    """Supervised fine-tuning on (prompt, rewrite) with TRL's SFTTrainer; the loss is on the
    completion only. Returns the saved model folder."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if not rows:
        raise ValueError("no kept rewrites to fine-tune on: the rewrites stage kept no pair")
    tok = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(base_model, trust_remote_code=False, use_safetensors=True)
    args = SFTConfig(output_dir=str(out / "checkpoints"), max_steps=max_steps, learning_rate=learning_rate,
                     per_device_train_batch_size=batch_size, save_strategy="no", report_to="none",
                     logging_steps=max(1, max_steps // 4), seed=seed, use_cpu=True, max_length=1024,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    folder = out / "model"
    trainer.save_model(str(folder))
    tok.save_pretrained(folder)
    return folder
