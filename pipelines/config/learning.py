"""Run configuration, part two: the sections of the learning stages (rewrites, rewards,
reward_model, train, online rounds, evaluate) and the ablations. `pipelines/config/run.py`
holds the data stages, serving and `RunConfig`, and re-exports every class here, so
`from pipelines.config import TrainConfig` works as before.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from actors.followup_labels import FOLLOWUP_LABELS
from actors.models import ModelSpec
from pipelines.registry import ROUND_STAGES, in_pipeline_order

FEEDBACK_LABEL_NAMES = FOLLOWUP_LABELS[:3]


class _Section(BaseModel):
    """A config section: unknown keys are errors, values are read-only once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AblationConfig(_Section):
    """The paper's ablations, applied to every stage that reads them."""

    user_agnostic: bool = False
    """Drop the persona block everywhere: sampler, reward model, rewriter, judge, prompts."""
    rewrites_from_scratch: bool = False
    """The rewriter does not see the user's follow-up (it rewrites from the persona alone)."""


class QualityFilterConfig(_Section):
    """Which rewrite pairs are kept (the paper finds the filter essential)."""

    min_tokens: PositiveInt = 2
    """A rewrite or rejected answer shorter than this (tokenizer of models.policy) is dropped."""
    max_tokens: PositiveInt = 1024
    """A rewrite longer than this is dropped (`too_long`)."""
    max_length_ratio: float = Field(4.0, gt=1)
    """A rewrite more than this many times longer or shorter than the rejected answer is
    dropped (`length_ratio`)."""
    truncate_tokens: PositiveInt = 1024
    """Rewrite and rejected answer identical in their first this-many tokens: dropped
    (`identical_after_truncation`); the training max_length cuts them to the same text."""
    margin: float = Field(0.05, ge=0, le=0.5)
    """The judge (models.judge, both orders) must give P(rewrite better) >= 0.5 + margin."""
    judge: bool = True
    """False skips the judge check (no margin recorded); the other checks still run."""
    drop_refusal_to_compliance: bool = True
    """A rewrite that complies where the rejected answer refused is dropped and counted:
    jailbreak re-attempts must not become training signal."""
    drop_truncated: bool = True
    """A rewrite cut at models.rewriter.max_new_tokens is dropped (`truncated`): as chosen,
    its closed turn would teach the policy to stop mid-answer. Off only where the limit is
    set low on purpose (a quick demo) and most rewrites are cut."""


class RewritesConfig(_Section):
    """Stage `rewrites`: user-guided rewrites from feedback follow-ups (pipelines/stages/rewrites/stage.py)."""

    rejected: Literal["regenerated", "original"] = "regenerated"
    """`regenerated` (the paper, on-policy): the policy re-answers the context and that is
    the rejected answer; `original`: the logged answer, for comparison."""
    labels: list[Literal[FEEDBACK_LABEL_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(FEEDBACK_LABEL_NAMES))
    """Follow-up labels that carry feedback and get a rewrite."""
    max_followups: PositiveInt | None = None
    """Cap on follow-ups rewritten (the first ones by conversation and turn); None: all."""
    batch_size: PositiveInt = 8
    workers: PositiveInt | None = None
    """Actors per role pool; default: the CPUs Ray has."""
    rewriter_via: Literal["pool", "serve"] = "pool"
    """`pool`: each actor loads models.rewriter itself; `serve`: the actors call the running
    `rlhi serve` app (POST /v1/rewrite at serve.url) for the rewrites, so one batched set
    of replicas serves them. The policy and the judge stay in the pool either way."""
    filter: QualityFilterConfig = QualityFilterConfig()


class RewardsConfig(_Section):
    """Stage `rewards`: user-based rewards, N candidates scored with the persona."""

    n: int = Field(4, ge=2)
    """Candidates the PolicySampler draws per prompt."""
    backend: Literal["judge", "classifier", "trained"] = "judge"
    """RewardModel backend on models.reward; `trained` uses this run's reward_model stage."""
    threshold: Literal["zscore", "quantile"] = "zscore"
    """Relative, since reward scales differ between models: `zscore` keeps best vs worst
    when (best - worst) >= min_z x the run's pooled within-prompt std of scores (the reward
    model's own scale); `quantile` when best - worst is in the top `1 - quantile` of this
    run's per-prompt margins."""
    min_z: float = Field(1.0, ge=0)
    quantile: float = Field(0.5, ge=0, lt=1)
    include_first_turns: bool = True
    """First user turns of conversations are prompts."""
    include_no_feedback_turns: bool = True
    """Turns whose follow-up carries no feedback (or that have none) are prompts."""
    max_prompts: PositiveInt | None = None
    """Cap on prompts sampled (the first ones by conversation and turn); None: all."""
    drop_truncated_chosen: bool = True
    """A prompt whose best candidate was cut at models.policy.max_new_tokens makes no pair
    (`truncated_chosen`): as chosen, its closed turn would teach the policy to stop
    mid-answer. Off only where the limit is set low on purpose and most answers are cut."""
    batch_size: PositiveInt = 8
    workers: PositiveInt | None = None
    reward_via: Literal["pool", "serve"] = "pool"
    """`pool`: each actor loads the RewardModel (`backend` on models.reward) itself;
    `serve`: the actors call the running `rlhi serve` app (POST /v1/score at serve.url),
    whose model is `serve.reward.backend` on its models.reward, and `backend` is unused.
    The policy sampler stays in the pool either way."""


class RewardModelConfig(_Section):
    """Stage `reward_model`: a Bradley-Terry reward model on training users' rewrite pairs."""

    encoder: ModelSpec = ModelSpec(id="all-minilm-l6-v2")
    """Encoder the one-output head is put on (all-MiniLM-L6-v2 by default)."""
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: PositiveInt = 8
    max_length: PositiveInt = 512


class LoraSettings(_Section):
    """LoRA adapters (peft) instead of full fine-tuning."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(_Section):
    """Stage `train`: persona-DPO with TRL's DPOTrainer on Ray Train (pipelines/stages/train/stage.py)."""

    sources: list[Literal["rewrite", "reward"]] = Field(default_factory=lambda: ["rewrite", "reward"])
    """Pair sources trained on."""
    beta: float = Field(0.1, gt=0)
    learning_rate: float = Field(5e-7, gt=0)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"])
    """TRL loss type(s); several are combined with `loss_weights`."""
    loss_weights: list[float] | None = None
    max_steps: int = Field(-1, ge=-1)
    """Optimizer steps; -1 trains `epochs` epochs."""
    epochs: float = Field(1.0, gt=0)
    per_device_batch_size: PositiveInt = 2
    gradient_accumulation_steps: PositiveInt = 1
    max_length: PositiveInt = 1024
    """Prompt + answer tokens; longer pairs are cut from the end of the answers."""
    lora: LoraSettings | None = None
    precompute_ref_log_probs: bool = False
    """Reference log-probs computed once before training; the reference model is then not
    kept in memory."""
    gradient_checkpointing: bool = False
    bf16: bool | None = None
    """None: bf16 on GPUs that support it, fp32 on CPU."""
    fsdp: bool = False
    """FSDP full sharding (parameters, gradients, optimizer state) for models that do not
    fit one GPU."""
    workers: PositiveInt = 1
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    save_steps: PositiveInt = 50
    """A checkpoint every this many steps (and at the end)."""
    logging_steps: PositiveInt = 1
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 reports the per-step metrics (TRL's `report_to`): `tensorboard` under
    `train/storage/tensorboard/`; `mlflow`: one run per train step with the run's
    configuration, the metrics and the exported policy's path (pipelines/stages/train/
    tracking.py); `wandb`: W&B, configured by its own environment (WANDB_PROJECT,
    WANDB_API_KEY) on the workers."""
    mlflow_tracking_uri: str | None = None
    """MLflow store (`http://host:5000` for a team's tracking server, `sqlite:///path.db`);
    None: $MLFLOW_TRACKING_URI, else the SQLite store `<run_dir>/mlflow.db`."""
    mlflow_experiment: str = "rlhi"
    """MLflow experiment the runs go to (created when missing)."""
    max_failures: int = Field(1, ge=0)
    """Ray Train restarts a failed worker group this many times, from the last checkpoint."""
    resources_timeout_s: float = Field(300, gt=0)
    """Fail when the workers' resources are not free after this long."""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU (80 for an H100 80GB); `rlhi run --dry-run` says which settings fit."""

    @model_validator(mode="after")
    def _export_is_possible(self) -> "TrainConfig":
        if self.fsdp and self.lora is not None:
            raise ValueError("train.lora with train.fsdp is not supported: the exported policy merges the "
                             "adapter into weights one rank holds; use FSDP without LoRA, or LoRA without FSDP")
        return self


SERVED_ROUND_STAGES = ("ingest", "followups", "personas")


class OnlineConfig(_Section):
    """Online rounds after the first training: sample and score with the newest policy,
    build new pairs, train with the previous policy as reference."""

    rounds: int = Field(0, ge=0)
    """Extra rounds after round 0; each writes `<run_dir>/round-<k>/`."""
    stages: list[Literal[ROUND_STAGES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["rewards", "pairs", "train"])
    """Stages each online round reruns with the newest policy (a `served_logs` round also
    ingest, followups and personas, first)."""
    source: Literal["pipeline", "served_logs"] = "pipeline"
    """What a round learns from. `pipeline`: round 0's conversations again, sampled and
    scored with the newest policy. `served_logs`: the conversations the chat app logged
    (`logs`) since the round before: the round ingests only those rows (a ledger in its
    ingest output records what it read, pipelines/stages/ingest/served.py), rebuilds
    personas with the users' whole history, makes pairs from the new follow-ups and turns,
    trains from the current policy and exports it; `stages` must include ingest, followups
    and personas. Each `rlhi run` with `rounds` one higher runs one more round."""
    logs: str | None = None
    """The chat log folder a served_logs round reads; None: `serve.chat.log.folder`."""

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value: list[str]) -> list[str]:
        return in_pipeline_order(value, "online.stages")

    @model_validator(mode="after")
    def _source_stages(self) -> "OnlineConfig":
        data_stages = [name for name in SERVED_ROUND_STAGES if name in self.stages]
        if self.source == "served_logs":
            missing = [name for name in SERVED_ROUND_STAGES if name not in self.stages]
            if missing:
                raise ValueError(f"online.source is served_logs, so online.stages must include {', '.join(missing)} "
                                 "(a round ingests the new log rows and rebuilds personas before it learns)")
        elif data_stages:
            raise ValueError(f"online.stages has {', '.join(data_stages)}, which only a round with "
                             "online.source: served_logs reruns (round 0 already read ingest.inputs)")
        return self


class BenchmarkConfig(_Section):
    """One benchmark file of the evaluate stage and the subset of it to run."""

    path: str
    """JSON-lines file in the benchmark's own format (pipelines/stages/evaluate/reasoning.py,
    pipelines/stages/evaluate/stage.py); point it at the full set to evaluate all of it."""
    n: int = Field(8, ge=0)
    """Items to evaluate; 0 skips the benchmark."""
    subset: Literal["first", "sample"] = "first"
    """`first`: the first n items; `sample`: n items drawn with the run's seed."""


class EvaluateConfig(_Section):
    """The evaluate stage (`rlhi eval`): the last trained policy against the base policy,
    judged by `models.judge` (any engine: `engine: openai` plugs in a strong hosted judge)."""

    max_turns: int = Field(8, ge=0)
    """UserEval: evaluation users' first turns to compare, and as many follow-up turns
    (a user turn after an assistant answer); drawn round-robin over users, seeded. 0 skips."""
    criteria: list[Literal["personalization", "instruction_following", "overall"]] = Field(
        default_factory=lambda: ["personalization", "instruction_following", "overall"])
    """UserEval judging criteria, each one judge question (actors/judge.py `criterion`)."""
    gsm8k: BenchmarkConfig = BenchmarkConfig(path="data/eval/gsm8k_test.jsonl", n=8)
    """GSM8K test problems (`question`, `answer` ending in `#### N`); accuracy by math-verify."""
    math500: BenchmarkConfig = BenchmarkConfig(path="data/eval/math500_test.jsonl", n=4)
    """MATH-500 problems (`problem`, `answer` in LaTeX); accuracy by math-verify."""
    arena_hard: BenchmarkConfig = BenchmarkConfig(path="data/eval/arena-hard-v0.1_question.jsonl", n=4)
    """Arena-Hard v0.1 questions (`uid`, `prompt`): pairwise trained vs base by the judge."""
    judge_checks: int = Field(4, ge=0)
    """Known-answer pairs per kind (gold GSM8K solution vs a wrong final number; vs the same
    solution scrambled) on which the judge's accuracy is measured. 0 skips."""
    max_new_tokens: PositiveInt = 128
    """Generated tokens per answer, both arms (greedy decoding, so arms differ by weights)."""
    reason_tokens: int = Field(0, ge=0)
    """Tokens of the judge's one-sentence reason (0: none, judging by label likelihood only)."""
    bootstrap_samples: PositiveInt = 1000
    """Bootstrap draws (users resampled with replacement) behind every 95% interval."""
    batch_size: PositiveInt = 8
    """Prompts per engine call."""
