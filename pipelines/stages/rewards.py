"""Stage `rewards`: user-based rewards (DESIGN.md, source 2), N candidates scored with the persona.

Top to bottom:
1. Prompts (`reward_prompts`, a plain function): the first user turn of every conversation
   and every user turn whose follow-up carries no feedback. A turn whose follow-up is
   feedback (FEEDBACK_LABELS) is the rewrites stage's, so it is skipped here, unless it is
   a first turn and `include_first_turns` is on. The context is the conversation up to and
   including that user turn, after the conversation's own system message when it has one.
2. Personas: the snapshot built from the user's conversations before the turn's own
   (`attach_personas`); none
   under `ablation.user_agnostic`.
3. Sampling and scoring in a Ray Data actor pool (`RewardWorker`): the PolicySampler draws
   `rewards.n` candidates, the RewardModel scores them with the persona. The per-batch
   logic is `sample_and_score`, a plain function on the two roles. With
   `rewards.reward_via: serve` the scores come from the running `rlhi serve` app instead
   (serve/roles.py ServedRewardModel, POST /v1/score; its model is serve.reward.backend on
   models.reward), checked healthy before any actor starts. The sampler stays in the pool:
   the chat app would condition on the user's serving persona, built from ALL their
   history, leaking later conversations into earlier turns' prompts.
4. Pair selection and threshold (pipelines/stages/reward_threshold.py): best versus worst,
   kept only when the margin clears a threshold relative to the prompt's own scores
   (`zscore`) or to this run's margins (`quantile`), because reward scales differ between
   backends and models. On Ray each actor selects its batch's pairs and writes the batch as
   a part; the driver, which sees only margins and variances, fits the run's threshold, and
   one Ray task a part applies it in place.

Every prompt gets one `samples` row with all candidates and scores and status kept or
filtered with the reason; prompts beyond `max_prompts` are filtered `over_cap` without any
model call. A kept row records its pair's candidates (`chosen_index`, `rejected_index`), from
which the pairs stage builds the reward pairs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from actors.models import ModelSpec
from pipelines.config import RewardsConfig, RunConfig
from pipelines.persona_join import attach_personas
from pipelines.rounds import actor_gpus, new_turns, policy_spec, upstream_round
from pipelines.stages.reward_threshold import Threshold, decide, select, within_variance
from pipelines.schema import FEEDBACK_LABELS, MESSAGES, SAMPLES, check_schema, model_path, stage_dir, table_path
from pipelines.contract import BATCH, StageWriter, batch_part_name, numbered_batches, require_stage
from pipelines.runtime import map_tasks

if TYPE_CHECKING:
    from serve.roles import Endpoint

STAGE = "rewards"
PROMPT_COLUMNS = ("sample_id", "user_id", "persona_id", "conversation_id", "turn_index", "persona", "context")
PROMPT_SCHEMA = pa.schema([("sample_id", pa.string()), ("user_id", pa.string()), ("persona_id", pa.string()),
                           ("conversation_id", pa.string()), ("turn_index", pa.int32()), ("persona", pa.string()),
                           ("context", MESSAGES)])
# What an actor returns per prompt: all the run's threshold needs (Threshold.fit).
SELECTION = pa.schema([("margin", pa.float64()), ("selected", pa.bool_()), ("variance", pa.float64())])

# A prompt beyond `max_prompts`: filtered without any model call. The other reasons a prompt
# yields no pair are reward_threshold.py's.
OVER_CAP = "over_cap"


def sample_id(conversation_id: str, turn_index: int, round_index: int) -> str:
    """Stable id of one prompt's samples: the same turn in the same round, the same id."""
    return hashlib.sha256(f"{conversation_id}\x1f{turn_index}\x1f{round_index}".encode()).hexdigest()[:20]


# --- 1. prompts ---------------------------------------------------------------------------

def feedback_turns(followups: pa.Table) -> set[tuple[str, int]]:
    """(conversation_id, turn_index) of every follow-up labelled as feedback."""
    rows = followups.select(["conversation_id", "turn_index", "label"]).to_pylist()
    return {(r["conversation_id"], r["turn_index"]) for r in rows if r["label"] in FEEDBACK_LABELS}


def reward_prompts(conversations: pa.Table, followups: pa.Table, *, include_first_turns: bool,
                   include_no_feedback_turns: bool) -> tuple[list[dict[str, Any]], int]:
    """The user turns to sample for, ordered by conversation and turn, and how many user
    turns were left to the rewrites stage (their follow-up is feedback).

    Each prompt: conversation_id, user_id, turn_index, time (the turn's own timestamp, else
    the conversation's), context (messages ending with that user turn), first_turn.
    """
    feedback = feedback_turns(followups)
    columns = ["conversation_id", "user_id", "timestamp", "system", "turns"]
    prompts, covered = [], 0
    for conv in sorted(conversations.select(columns).to_pylist(), key=lambda c: c["conversation_id"]):
        turns = conv["turns"]
        users = [i for i, t in enumerate(turns) if t["role"] == "user"]
        prefix = [{"role": "system", "content": conv["system"]}] if conv["system"] else []
        for position, index in enumerate(users):
            first = position == 0
            followup = users[position + 1] if position + 1 < len(users) else None
            has_feedback = followup is not None and (conv["conversation_id"], followup) in feedback
            if first:
                wanted = include_first_turns
            else:
                wanted = include_no_feedback_turns and not has_feedback
            covered += has_feedback and not wanted
            if not wanted:
                continue
            prompts.append({
                "conversation_id": conv["conversation_id"], "user_id": conv["user_id"],
                "turn_index": index, "time": turns[index]["timestamp"] or conv["timestamp"],
                "context": prefix + [{"role": t["role"], "content": t["content"]} for t in turns[: index + 1]],
                "first_turn": first,
            })
    return prompts, covered


# --- 3. sampling and scoring --------------------------------------------------------------

def sample_and_score(sampler, reward_model, personas: Sequence[str], contexts: Sequence[Any]) -> list[dict[str, Any]]:
    """Candidates from the PolicySampler and their scores from the RewardModel, both with
    the persona ("" is none). Returns prompt (the exact DPO prompt), candidates, scores."""
    samples = sampler.sample_batch(list(personas), list(contexts))
    scores = reward_model.score_batch([p or None for p in personas], list(contexts),
                                      [s.candidates for s in samples])
    return [{"prompt": s.prompt, "candidates": s.candidates, "truncated": s.truncated,
             "scores": [float(x) for x in sc]}
            for s, sc in zip(samples, scores, strict=True)]


class RewardWorker:
    """Ray Data callable class: builds the sampler and the reward model once per actor,
    then samples and scores each batch of prompts, selects each prompt's pair and writes
    the batch's `samples` rows as a part of the stage's unfinished output (`out`), the
    threshold still to apply. It returns per prompt only what the run's threshold needs
    (margin, within-prompt variance), never the rows. With `served` (a serve/roles.py
    Endpoint) the reward model is the served app."""

    def __init__(self, policy: dict[str, Any], n: int, backend: str, reward: dict[str, Any], out: str,
                 round_index: int, served: Endpoint | None = None, drop_truncated_chosen: bool = True) -> None:
        from actors.engines import EngineCache
        from actors.policy_sampler import PolicySampler
        from actors.reward_model import RewardModel
        from serve.roles import ServedRewardModel

        engines = EngineCache()  # policy and judge-backend reward model: one copy if the same model
        self.sampler = PolicySampler(policy, n, engine=engines.get(policy))
        self.reward_model = ServedRewardModel(served) if served is not None else RewardModel(
            backend, reward, engine=engines.get(reward) if backend == "judge" else None)
        self.backend, self.out, self.round_index = backend, Path(out), round_index
        self.drop_truncated_chosen = drop_truncated_chosen

    def __call__(self, batch: pa.Table) -> pa.Table:
        prompts = batch.drop_columns([BATCH]).to_pylist()
        scored = sample_and_score(self.sampler, self.reward_model, [p["persona"] for p in prompts],
                                  [p["context"] for p in prompts])
        rows = [select(sample_row(prompt, result, self.backend, self.round_index), self.drop_truncated_chosen)
                for prompt, result in zip(prompts, scored)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES),
                       self.out / batch_part_name(batch))
        return pa.table({"margin": [r["margin"] for r in rows], "selected": [r["reason"] is None for r in rows],
                         "variance": [within_variance(r["scores"]) for r in rows]}, schema=SELECTION)


# --- the stage on Ray Data ----------------------------------------------------------------

def reward_model_spec(config: RunConfig) -> dict[str, Any]:
    """models.reward, or for backend `trained` the model this run's reward_model stage saved."""
    if config.rewards.backend != "trained":
        return config.models.reward.model_dump()
    folder = model_path(config.run_dir, "reward_model").resolve()
    return config.models.reward.model_copy(update={"id": str(folder)}).model_dump()


def score_with_ray(prompts: pd.DataFrame, config: RunConfig, policy: ModelSpec, out: Path, round_index: int,
                   served: Endpoint | None = None) -> pa.Table:
    """Sample from `policy` and score every row of `prompts` in an actor pool, each batch
    written by its actor as `out/part-<batch>.parquet` (scored by the server at `served`,
    else by a RewardModel in each actor); returns per prompt its margin, whether it makes a
    pair, and its within-prompt variance."""
    import ray

    settings = config.rewards
    workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    batches = math.ceil(len(prompts) / settings.batch_size)
    table = pa.Table.from_pandas(prompts[list(PROMPT_COLUMNS)], schema=PROMPT_SCHEMA, preserve_index=False)
    # Half a CPU per actor: a pool holding every CPU starves Ray Data's own tasks.
    # One block per batch, so every actor of the pool gets work.
    blocks = numbered_batches(table, settings.batch_size)
    gpus = actor_gpus(policy, None if served else reward_model_spec(config))
    dataset = ray.data.from_arrow(blocks).map_batches(
        RewardWorker, batch_size=settings.batch_size, batch_format="pyarrow", num_cpus=0.5, num_gpus=gpus,
        fn_constructor_kwargs={"policy": policy.model_dump(), "n": settings.n, "backend": settings.backend,
                               "reward": reward_model_spec(config), "out": str(out),
                               "round_index": round_index, "served": served,
                               "drop_truncated_chosen": settings.drop_truncated_chosen},
        compute=ray.data.ActorPoolStrategy(size=min(workers, batches)))
    parts = list(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(parts) if parts else SELECTION.empty_table()


def finish_parts(out: Path, threshold: Threshold, settings: RewardsConfig) -> list[dict[str, Any]]:
    """Apply the run's threshold to every part in place, in Ray tasks; returns each part's
    counts (rows, kept, filtered by reason, candidates)."""
    return map_tasks(finish_part, [(str(path), threshold, settings) for path in sorted(out.glob("*.parquet"))])


def finish_part(path: str, threshold: Threshold, settings: RewardsConfig) -> dict[str, Any]:
    """`decide` the undecided rows of one part and rewrite it atomically (a part with none,
    the over-cap one, stays as it is); returns its counts."""
    rows = pq.read_table(path).to_pylist()
    if any(not row["status"] for row in rows):
        rows = [row if row["status"] else decide(row, threshold, settings) for row in rows]
        partial = f"{path}.partial"
        pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLES), partial)
        os.replace(partial, path)
    return {"rows": len(rows), "kept": sum(r["status"] == "kept" for r in rows),
            "filtered": dict(Counter(r["reason"] for r in rows if r["status"] == "filtered")),
            "candidates": sum(len(r["candidates"]) for r in rows)}


def sample_row(prompt: dict[str, Any], result: dict[str, Any] | None, backend: str,
               round_index: int) -> dict[str, Any]:
    """The SAMPLES row of one prompt: scored (`result`), or without a result `over_cap`."""
    return {
        "sample_id": prompt["sample_id"], "user_id": prompt["user_id"], "persona_id": prompt["persona_id"],
        "conversation_id": prompt["conversation_id"], "turn_index": prompt["turn_index"],
        "prompt": result["prompt"] if result else [],
        "candidates": result["candidates"] if result else [],
        "truncated": result.get("truncated") if result else [],
        "scores": result["scores"] if result else [],
        "reward_backend": backend, "round": round_index,
        "status": None if result else "filtered", "reason": None if result else OVER_CAP, "margin": None,
        "chosen_index": None, "rejected_index": None,
    }


def connect_reward_model(config: RunConfig) -> Endpoint | None:
    """The serve/roles.py Endpoint when rewards.reward_via is serve (checked healthy now,
    before any actor starts), else None."""
    if config.rewards.reward_via != "serve":
        return None
    if config.rewards.n > config.serve.max_candidates:
        raise ValueError(f"rewards.n = {config.rewards.n} candidates, but the server takes at most "
                         f"serve.max_candidates = {config.serve.max_candidates} per request")
    from serve.roles import connect

    return connect(config)


def run_rewards(config: RunConfig, round_index: int = 0) -> dict[str, Any]:
    """Run the stage into `<round_dir>/rewards/` (table `samples`); returns its summary."""
    run_dir, settings = Path(config.run_dir), config.rewards
    source = {name: upstream_round(config, name, round_index) for name in ("ingest", "followups", "personas")}
    upstream = {name: require_stage(run_dir, name, k) for name, k in source.items()}
    policy = policy_spec(config, round_index)  # fails early when round k-1 exported no policy
    served = connect_reward_model(config)
    # Scores come from the server's RewardModel when served: its backend, on models.reward.
    backend = config.serve.reward.backend if served else settings.backend
    reward_spec = config.models.reward.model_dump() if served else None
    if settings.backend == "trained" and not served:
        upstream["reward_model"] = require_stage(run_dir, "reward_model")
    conversations = pq.read_table(table_path(run_dir, "ingest", "conversations", source["ingest"]))
    followups = pq.read_table(table_path(run_dir, "followups", "followups", source["followups"]))
    found, covered = reward_prompts(conversations, followups, include_first_turns=settings.include_first_turns,
                                    include_no_feedback_turns=settings.include_no_feedback_turns)
    fresh = new_turns(config, round_index, [p["conversation_id"] for p in found], [p["turn_index"] for p in found])
    found = [prompt for prompt, new in zip(found, fresh) if new]
    prompts = pd.DataFrame(found, columns=["conversation_id", "user_id", "turn_index", "time", "context", "first_turn"])
    prompts["sample_id"] = [sample_id(conversation, index, round_index)
                            for conversation, index in zip(prompts["conversation_id"], prompts["turn_index"])]
    prompts = attach_personas(prompts, run_dir, user_agnostic=config.ablation.user_agnostic,
                              round_index=source["personas"])
    capped = prompts if settings.max_prompts is None else prompts.iloc[: settings.max_prompts]
    with StageWriter(run_dir, STAGE, round_index) as stage:
        out = stage.table_dir("samples")
        selected = score_with_ray(capped, config, policy, out, round_index, served) if len(capped) \
            else SELECTION.empty_table()
        over = [sample_row(prompt, None, backend, round_index) for prompt in prompts.iloc[len(capped):].to_dict("records")]
        pq.write_table(pa.Table.from_pylist(over, schema=SAMPLES), out / "part-over-cap.parquet")
        paired = selected.filter(selected.column("selected"))
        threshold = Threshold.fit(paired.column("margin").to_pylist(), paired.column("variance").to_pylist(), settings)
        parts = finish_parts(out, threshold, settings)
        reasons = Counter()
        for part in parts:
            reasons.update(part["filtered"])
        kept, sampled = sum(part["kept"] for part in parts), selected.num_rows
        if kept + sum(reasons.values()) != len(prompts) or sampled != len(capped) \
                or sum(part["rows"] for part in parts) != len(prompts):
            raise RuntimeError(f"rewards lost prompts: {len(prompts)} prompts, {sampled} of "
                               f"{len(capped)} scored, {kept} kept, {sum(reasons.values())} filtered")
        summary = {
            "prompts": len(prompts), "first_turns": int(prompts["first_turn"].sum()),
            "no_feedback_turns": int((~prompts["first_turn"].astype(bool)).sum()),
            "turns_left_to_rewrites": covered, "sampled": sampled, "kept": kept,
            "filtered": dict(sorted(reasons.items())),
            "candidates": sum(part["candidates"] for part in parts),
            "with_persona": int(sum(1 for p in prompts["persona"] if p)),
            "n": settings.n, "backend": backend, "threshold": settings.threshold,
            "round": round_index, "reward_via": settings.reward_via,
        }
        if served is not None:
            # What the config says the server runs: the stage cannot see inside it.
            summary["served"] = {"url": served.url, "backend": backend, "model": config.models.reward.id}
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        models = [policy.model_dump(), reward_spec or reward_model_spec(config)] if len(capped) else []
        stage.commit(config=config, upstream=upstream, models=models, counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE, round_index))
    return summary
