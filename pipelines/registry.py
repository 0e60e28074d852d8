"""Every stage of the pipeline, declared once.

A `Stage` says what the driver (pipelines/driver.py), the configuration's allowed names
(pipelines/config/), the run report, each stage's manifest (pipelines/contract.py) and
`rlhi run --dry-run` need to know about it: its name, the function that runs it, the
configuration keys its output depends on, whether online rounds rerun it, and which
stages' tables it reads. Runners are named by dotted path and imported only when a stage
runs, so this module imports no stage (and no stage imports it).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    run: str
    """`module:function`; the function takes (config) or, per round, (config, round_index)
    and returns the stage's summary."""
    settings: tuple[str, ...]
    """Dotted configuration keys (sections or sub-keys) whose values its output depends on:
    hashed into its manifest's `config_hash` and the driver's rerun key."""
    per_round: bool
    """Online rounds can rerun it, under `<run_dir>/round-<k>/` (ingest, followups and
    personas only when a round reads served logs: pipelines/config/learning.py OnlineConfig)."""
    reads: tuple[str, ...]
    """Stages whose tables it reads (a `reward_model` entry only when configured to)."""
    optional: bool = False
    """Left out of the default `stages` list."""
    last: bool = False
    """Runs after the online rounds, so it sees the newest policy (evaluate)."""

    @property
    def module(self) -> str:
        return self.run.split(":")[0]

    def runner(self) -> Callable[..., dict[str, Any]]:
        module, function = self.run.split(":")
        return getattr(import_module(module), function)


STAGES = (
    Stage("ingest", "pipelines.stages.ingest.stage:run_ingest", ("ingest",), per_round=True, reads=()),
    Stage("followups", "pipelines.stages.followups:run_followups", ("followups", "models.classifier"),
          per_round=True, reads=("ingest",)),
    Stage("personas", "pipelines.stages.personas:run_personas", ("personas", "models.persona"),
          per_round=True, reads=("ingest", "followups")),
    Stage("rewrites", "pipelines.stages.rewrites.stage:run_rewrites",
          ("rewrites", "ablation", "models.policy", "models.rewriter", "models.judge"),
          per_round=True, reads=("followups", "personas")),
    Stage("reward_model", "pipelines.stages.train_reward_model:run_reward_model", ("reward_model",),
          per_round=False, reads=("rewrites", "personas"), optional=True),
    Stage("rewards", "pipelines.stages.rewards:run_rewards",
          ("rewards", "ablation", "models.policy", "models.reward", "serve.reward"),
          per_round=True, reads=("ingest", "followups", "personas", "reward_model")),
    Stage("pairs", "pipelines.stages.pairs:run_pairs", ("train.sources", "ablation"),
          per_round=True, reads=("followups", "personas", "rewrites", "rewards")),
    Stage("train", "pipelines.stages.train.stage:run_train", ("train", "models.policy"),
          per_round=True, reads=("pairs",)),
    Stage("evaluate", "pipelines.stages.evaluate.stage:run_evaluate",
          ("evaluate", "ablation", "models.policy", "models.judge"),
          per_round=False, reads=("ingest", "personas", "train"), optional=True, last=True),
)
BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_NAMES = tuple(BY_NAME)
ROUND_STAGES = tuple(stage.name for stage in STAGES if stage.per_round)
DEFAULT_STAGES = tuple(stage.name for stage in STAGES if not stage.optional)


def in_pipeline_order(stages: list[str], key: str) -> list[str]:
    """`stages` unchanged if each appears once, in the pipeline's order; else a ValueError
    naming `key` and the order they must be in (the driver runs them as listed)."""
    ordered = [name for name in STAGE_NAMES if name in stages]
    if len(set(stages)) != len(stages):
        raise ValueError(f"{key} lists a stage twice: {stages}")
    if list(stages) != ordered:
        raise ValueError(f"{key} must list its stages in pipeline order: {ordered} (got {list(stages)})")
    return stages


def stage(name: str) -> Stage:
    """The stage called `name`; an error listing the stages otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGE_NAMES)}") from None


def setting(config: Any, dotted: str) -> Any:
    """The JSON-ready value of one dotted configuration key (`models.policy`)."""
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def settings_of(config: Any, name: str) -> dict[str, Any]:
    """The values a stage's output depends on: its settings keys and the seed."""
    return {"seed": config.seed, **{key: setting(config, key) for key in stage(name).settings}}


def settings_hash(config: Any, name: str) -> str:
    """A short hash of `settings_of`: the manifest's `config_hash`."""
    blob = json.dumps(settings_of(config, name), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
