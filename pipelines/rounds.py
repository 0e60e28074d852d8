"""Where a round's stages live, which policy a round uses, and the persona each turn sees.

Round 0 is the first pass: its rewrites, rewards, pairs and train stages write under the
run directory itself. Online round k (k >= 1) writes the same stages under
`<run_dir>/round-<k>/`, samples with the policy round k-1 trained and trains with that
policy as reference. Ingest, followups and personas exist once, in the run directory.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from actors.models import ModelSpec
from pipelines.config import RunConfig
from pipelines.stages.personas import join_personas

POLICY_FOLDER = "model"  # <train stage>/model: the exported policy (safetensors + tokenizer)


def round_dir(run_dir: Path | str, round_index: int) -> Path:
    """The folder round `round_index`'s stages write into."""
    run_dir = Path(run_dir)
    return run_dir if round_index == 0 else run_dir / f"round-{round_index}"


def policy_spec(config: RunConfig, round_index: int) -> ModelSpec:
    """The policy round `round_index` samples with: models.policy in round 0, else the
    model exported by the previous round's train stage (same decoding settings)."""
    if round_index == 0:
        return config.models.policy
    folder = round_dir(config.run_dir, round_index - 1) / "train" / POLICY_FOLDER
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"round {round_index} samples with the policy round {round_index - 1} "
                           f"trained, but {folder} holds no exported model: run its train stage first")
    return config.models.policy.model_copy(update={"id": str(folder.resolve()), "engine": "transformers"})


def attach_personas(frame: pd.DataFrame, run_dir: Path | str, *, user_agnostic: bool) -> pd.DataFrame:
    """Add `persona_id` and `persona` to rows with `user_id` and `time`: the latest snapshot
    built strictly before the turn (pipelines/stages/personas.py). User-agnostic runs get none."""
    frame = frame.copy()
    if user_agnostic or frame.empty:
        frame["persona_id"], frame["persona"] = None, ""
        return frame
    personas = pq.read_table(Path(run_dir) / "personas" / "personas")
    frame["persona_id"] = join_personas(frame, personas)
    text = dict(zip(personas.column("persona_id").to_pylist(), personas.column("persona").to_pylist()))
    frame["persona"] = [text.get(pid, "") if isinstance(pid, str) else "" for pid in frame["persona_id"]]
    frame["persona_id"] = [pid if isinstance(pid, str) else None for pid in frame["persona_id"]]
    return frame


def user_splits(run_dir: Path | str) -> dict[str, str]:
    """user_id -> "train" or "eval" (the personas stage's split by user)."""
    users = pq.read_table(Path(run_dir) / "personas" / "users", columns=["user_id", "split"])
    return dict(zip(users.column("user_id").to_pylist(), users.column("split").to_pylist()))


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
