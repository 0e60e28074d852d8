"""The run configuration: one YAML file describes a run, validated when it is loaded.

Every knob is named once here, with its default and what it does. A bad key or value fails
at load with a message naming the key, the value and what is allowed, e.g.

    configs/my.yaml: ingest.filters.max_chars = -5: Input should be greater than 0
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveInt, ValidationError, field_validator, model_validator

from actors.models import ModelSpec
from pipelines.redact import REDACTION_KINDS
from pipelines.storage import check_location
from pipelines.registry import DEFAULT_STAGES, STAGE_NAMES, in_pipeline_order
from pipelines.config.learning import (_Section, AblationConfig, BenchmarkConfig, EvaluateConfig,  # noqa: F401
                                      LoraSettings, OnlineConfig, QualityFilterConfig, RewardModelConfig,
                                      RewardsConfig, RewritesConfig, TrainConfig)

UserKey = Literal["hashed_ip", "hashed_ip+user_agent", "hashed_ip+user_agent+accept_language"]
InputFormat = Literal["auto", "wildchat", "jsonl"]
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message says which key and why."""


class Filters(_Section):
    """Ingest filters. Each one is counted with its reason in the stage summary."""

    languages: Literal["all"] | list[str] = "all"
    """Keep only these values of WildChat's `language` field (e.g. ["English", "French"]);
    "all" keeps every language. The field is read as given, never re-detected."""
    drop_toxic: bool = True
    """Drop conversations flagged toxic: the top-level or any per-turn `toxic`, or any
    `openai_moderation[].flagged`."""
    drop_redacted: bool = False
    """Drop conversations WildChat marked `redacted` (it replaced PII with placeholders)."""
    min_user_turns: PositiveInt = 1
    """Drop conversations with fewer user turns."""
    max_chars: PositiveInt = 200_000
    """Drop conversations whose turns hold more characters in total."""
    max_conversations_per_user: PositiveInt = 10_000
    """Keep at most this many conversations per user (the earliest by timestamp, input order
    breaking ties). Real WildChat has shared IPs with thousands of conversations."""


class IngestConfig(_Section):
    """Reading WildChat Parquet or chat JSONL into the `conversations` table."""

    inputs: list[str] = Field(default_factory=lambda: ["data/wildchat/train-00000-of-00001.parquet"])
    """Files, folders or globs; relative paths are read from the working directory. An
    `s3://` or `gs://` URI (a file or a prefix) is downloaded into the run's folder first."""
    format: InputFormat = "auto"
    """"auto" decides per file by extension (.parquet / .jsonl, .json)."""
    user_key: UserKey = "hashed_ip"
    """What makes a user: WildChat's `hashed_ip`, optionally with request headers."""
    filters: Filters = Filters()
    redact: list[str] = list(REDACTION_KINDS)
    """Kinds of identifiers and secrets replaced in every turn before anything downstream
    sees it. WildChat's own <PRESIDIO_ANONYMIZED_...> placeholders are left as they are."""
    skip_bad_files: bool = False
    """A file that cannot be read fails the stage; true lists it in the summary instead."""
    rows_per_task: PositiveInt = 2_000
    """Rows one Ray Data task reads and checks at a time (bounds worker memory)."""
    workers: PositiveInt | None = None
    """Ray Data actors doing the work; default: the CPUs Ray has."""

    @field_validator("redact")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        return known_redaction_kinds(value)

    @field_validator("inputs")
    @classmethod
    def _openable_inputs(cls, value: list[str]) -> list[str]:
        return [check_location(item, "ingest input") for item in value]


def known_redaction_kinds(value: list[str]) -> list[str]:
    """The kinds in pipeline order, or an error naming the unknown ones."""
    unknown = sorted(set(value) - set(REDACTION_KINDS))
    if unknown:
        raise ValueError(f"unknown redaction kind(s) {unknown}; allowed: {', '.join(REDACTION_KINDS)}")
    return sorted(set(value), key=REDACTION_KINDS.index)


class ModelsConfig(_Section):
    """Which model plays each role (actors/models.py documents a model's fields)."""

    classifier: ModelSpec = ModelSpec()
    """Follow-up classifier for the `llm` and `cascade` backends."""
    persona: ModelSpec = ModelSpec()
    """Persona summariser for the `llm` persona backend."""
    policy: ModelSpec = ModelSpec()
    """The policy: samples candidates (rewards stage) and answers the serving chat app."""
    rewriter: ModelSpec = ModelSpec()
    """Rewrites answers using the user's feedback (rewrites stage, serving rewrite app)."""
    judge: ModelSpec = ModelSpec()
    """Pairwise judge: the rewrites quality filter (does the rewrite beat the rejected
    answer?) and evaluation. Never a model trained on this run's pairs."""
    reward: ModelSpec = ModelSpec()
    """Reward model of `serve.reward.backend`: an instruct model for `judge` (the default,
    SmolLM2), a reward-model id or folder for `classifier`, the
    reward_model stage's folder for `trained`."""


class FollowupsConfig(_Section):
    """Classifying each user follow-up (actors/followup_classifier.py)."""

    backend: Literal["rules", "llm", "learned", "cascade"] = "rules"
    """`rules`: no model, for scale; `llm`: label likelihood under models.classifier;
    `learned`: the logistic regression over sentence embeddings trained on the development
    labels (`learned_model`); `cascade`: rules as a prefilter, then `cascade_model` on what
    they do not call a confident new request."""
    cascade_model: Literal["llm", "learned"] = "llm"
    """The model the `cascade` backend asks about what the rules flag."""
    learned_model: str | None = None
    """Folder of the `learned` backend's artifact (`rlhi train-followups --out` writes one);
    default: the bundled `data/models/followup-learned/`, trained on the development labels."""
    batch_size: PositiveInt = 64
    """Follow-ups per classifier call."""
    workers: PositiveInt | None = None
    """Actors in the classifier pool; default: the CPUs Ray has."""


class PersonasConfig(_Section):
    """Persona snapshots per user (pipelines/stages/personas.py)."""

    backend: Literal["extractive", "llm"] = "extractive"
    """`extractive`: deterministic summary; `llm`: models.persona summarises the history."""
    cadence: PositiveInt = 1
    """A snapshot after every `cadence` conversations (1 on small data, more at scale)."""
    history_max_conversations: PositiveInt = 20
    """At most this many earlier conversations per persona, the most recent first."""
    history_max_tokens: PositiveInt = 2_000
    """And at most about this many tokens of the user's own turns."""
    max_persona_chars: PositiveInt = 600
    """Persona text is cut to this length."""
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of users held out for evaluation (by a hash of the user key)."""
    min_eval_users_with_history: int = Field(2, ge=0)
    """Evaluation users who have two or more conversations, guaranteed."""
    workers: PositiveInt | None = None


class ResourcesConfig(_Section):
    """Where the run executes."""

    address: str | None = None
    """Ray address: None starts a local Ray (or joins the one `ray job submit` provides)."""
    num_cpus: PositiveInt | None = None
    """CPUs of a local Ray; None lets Ray count them."""
    progress_bars: bool = True
    """Ray Data progress bars on the console."""


class AutoscalingConfig(_Section):
    """Serve autoscaling of one app's replicas (Ray Serve `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: float = Field(8.0, gt=0)
    """Requests in flight per replica that Serve steers towards."""


class ServeAppConfig(_Section):
    """Replicas and batching of one serving app."""

    enabled: bool = True
    num_replicas: PositiveInt = 1
    """Fixed replica count; ignored when `autoscaling` is set."""
    autoscaling: AutoscalingConfig | None = None
    """Scale between min and max replicas on load instead of a fixed count."""
    num_cpus: float = Field(0.5, ge=0)
    """CPUs Ray reserves per replica (fractions allowed; 0 on a crowded test box)."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica (1 for a vLLM engine on its own GPU)."""
    max_ongoing_requests: PositiveInt = 64
    """Requests one replica holds at once; at least max_batch_size so batches can fill."""
    max_batch_size: PositiveInt = 16
    """Requests merged into one model call (`serve.batch`); 1 turns batching off."""
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    """How long a partial batch waits for more requests."""


class RewardAppConfig(ServeAppConfig):
    """The reward app (`POST /v1/score`)."""

    max_ongoing_requests: PositiveInt = 128
    """Requests one replica holds at once (scoring is short: more wait to fill batches)."""
    max_batch_size: PositiveInt = 32
    """Requests merged into one model call (`serve.batch`); 1 turns batching off."""
    backend: Literal["judge", "classifier", "trained"] = "judge"
    """RewardModel backend run on `models.reward` (actors/reward_model.py)."""
    max_batch_tokens: PositiveInt = 16384
    """`classifier` and `trained` backends: tokens merged into one model call. A batch
    closes at `max_batch_size` requests or this many tokens, whichever comes first; a
    longer request runs alone. (The judge backend batches by requests only.)"""


class ChatLogConfig(_Section):
    """Conversation capture of the chat app (serve/chat_log.py): every finished turn of
    `/v1/chat/completions`, redacted, appended to Parquet parts in WildChat's Hub schema, so
    `ingest.inputs: [<folder>]` reads the served conversations back into a run."""

    enabled: bool = False
    """Off unless set: nothing a user says is stored by default."""
    folder: str = "logs/chat"
    """Where the `part-<n>.parquet` files go (created if missing); relative paths are read
    from the directory `rlhi serve` starts in. `rlhi forget --chat-log <folder>` removes a
    user from it."""
    max_batch_conversations: PositiveInt = 256
    """A part is written once the open batch holds this many conversations..."""
    max_batch_seconds: float = Field(60.0, gt=0)
    """...or once its oldest turn has waited this long. A crash loses at most the open batch."""
    redact: list[str] = list(REDACTION_KINDS)
    """Kinds of identifiers and secrets replaced in every logged turn (as `ingest.redact`)."""
    language: str = Field("English", min_length=1)
    """WildChat's `language` recorded for every logged conversation: the server does not
    detect languages, so this is the language the deployment serves (ingest's
    `filters.languages` reads it)."""

    @field_validator("redact")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        return known_redaction_kinds(value)


class RewriteAppConfig(ServeAppConfig):
    """The rewrite app (`POST /v1/rewrite`): small batches of long generations."""

    max_batch_size: PositiveInt = 4
    """Requests merged into one model call (`serve.batch`); 1 turns batching off."""


class ChatAppConfig(ServeAppConfig):
    """The chat app (`POST /v1/chat/completions`, `GET /v1/models`). Concurrent requests with
    equal sampling settings share a model call; a request with its own seed decodes alone."""

    log: ChatLogConfig = ChatLogConfig()
    """Conversation capture; off by default."""


class ServeConfig(_Section):
    """The HTTP endpoints (`rlhi serve`): reward scoring, rewriting, persona-guided chat."""

    host: str = "127.0.0.1"
    """Interface to bind; this machine only unless set (e.g. 0.0.0.0 behind a firewall)."""
    port: int = Field(8000, ge=1, le=65535)
    url: str | None = None
    """Where stages with `rewriter_via` / `reward_via: serve` reach the running server
    (e.g. http://serve-node:8000); None: http://{host}:{port}."""
    token_file: str | None = None
    """File holding the bearer token; None reads the environment variable RLHI_API_TOKEN.
    The token itself never goes in a config file."""
    run_dir: str | None = None
    """Run directory whose personas table (serving rows) feeds the chat app; None: the
    config's `run_dir`. A missing table means no personas. A URI is pulled into its working
    copy when the app starts."""
    max_body_bytes: PositiveInt = 1 << 20
    """Larger request bodies get 413 before they are parsed."""
    max_candidates: PositiveInt = 16
    """Candidates one /v1/score request may carry."""
    max_messages: PositiveInt = 64
    """Messages one request may carry."""
    max_chars: PositiveInt = 100_000
    """Characters of one message, candidate, answer or persona."""
    max_tokens: PositiveInt = 512
    """Upper bound on a request's `max_tokens` (chat) and on generated tokens (rewrite)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """The gateway gives up on a replica after this long (504)."""
    ingress_replicas: PositiveInt = 1
    """Replicas of the HTTP gateway (auth, validation, routing; no model)."""
    reward: RewardAppConfig = RewardAppConfig()
    rewrite: RewriteAppConfig = RewriteAppConfig()
    chat: ChatAppConfig = ChatAppConfig()

    @field_validator("run_dir")
    @classmethod
    def _openable_run_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_location(value, "serve.run_dir")


class RunConfig(_Section):
    """One run of the pipeline."""

    run_dir: str = "runs/default"
    """Where every stage writes its tables, manifests and summaries: a local folder, or an
    `s3://` / `gs://` URI (pipelines/storage.py: stages run in `work_dir` and are published
    to the store when finished)."""
    work_dir: str | None = None
    """The local working copy of a run whose `run_dir` is a URI (on a multi-node cluster,
    storage every node sees); default ~/.cache/rlhi/runs/<scheme>/<bucket>/<path>."""
    seed: int = 0
    """The run's seed: samples, splits and shuffles, and the sampling seed of every model
    that does not set `seed` itself (so a replicate with another seed draws other candidates)."""
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    """Stages to run, in pipeline order (pipelines/registry.py; `reward_model` and
    `evaluate` are optional)."""
    ingest: IngestConfig = IngestConfig()
    followups: FollowupsConfig = FollowupsConfig()
    personas: PersonasConfig = PersonasConfig()
    ablation: AblationConfig = AblationConfig()
    rewrites: RewritesConfig = RewritesConfig()
    rewards: RewardsConfig = RewardsConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    train: TrainConfig = TrainConfig()
    online: OnlineConfig = OnlineConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    models: ModelsConfig = ModelsConfig()
    resources: ResourcesConfig = ResourcesConfig()
    serve: ServeConfig = ServeConfig()

    @field_validator("run_dir")
    @classmethod
    def _openable_run_dir(cls, value: str) -> str:
        return check_location(value, "run_dir")

    @model_validator(mode="before")
    @classmethod
    def _models_take_the_run_seed(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict):
            return data
        seed, models = data.get("seed", 0), dict(data.get("models") or {})
        for role in ModelsConfig.model_fields:
            spec = models.get(role, {})
            if isinstance(spec, dict) and "seed" not in spec:
                models[role] = {**spec, "seed": seed}
        return {**data, "models": models}

    @field_validator("stages")
    @classmethod
    def _stages_in_order(cls, value: list[str]) -> list[str]:
        return in_pipeline_order(value, "stages")


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<top level>"
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    value = error.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    return f"{key} = {shown}: {error['msg']}"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> RunConfig:
    """Validate a configuration mapping; errors name every bad key at once."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err, RunConfig) for err in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run configuration from YAML; `overrides` replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file (try configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    data = dict(data or {})
    data.update(overrides or {})
    return parse_config(data, str(path))
