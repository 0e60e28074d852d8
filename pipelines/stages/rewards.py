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
4. Pair selection and threshold on the driver (`select_pair`, `apply_threshold`): best
   versus worst, kept only when the margin clears a threshold relative to the prompt's own
   scores (`zscore`) or to this run's margins (`quantile`), because reward scales differ
   between backends and models.

Every prompt gets one `samples` row with all candidates and scores and status kept or
filtered with the reason; prompts beyond `max_prompts` are filtered `over_cap` without any
model call. A kept row records its pair's candidates (`chosen_index`, `rejected_index`), from
which the pairs stage builds the reward pairs.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from actors.models import ModelSpec
from pipelines.config import RewardsConfig, RunConfig
from pipelines.persona_join import attach_personas
from pipelines.rounds import actor_gpus, policy_spec
from pipelines.schema import FEEDBACK_LABELS, MESSAGES, SAMPLES, check_schema, model_path, stage_dir, table_path
from pipelines.contract import StageWriter, require_stage

if TYPE_CHECKING:
    from serve.roles import Endpoint

STAGE = "rewards"

# Reasons a prompt yields no pair, in the order they are checked.
OVER_CAP = "over_cap"
TOO_FEW_CANDIDATES = "too_few_candidates"
INVALID_SCORES = "invalid_scores"
IDENTICAL_CANDIDATES = "identical_candidates"
EMPTY_CANDIDATE = "empty_candidate"
TIED_SCORES = "tied_scores"
BELOW_THRESHOLD = "below_threshold"


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
    return [{"prompt": s.prompt, "candidates": s.candidates, "scores": [float(x) for x in sc]}
            for s, sc in zip(samples, scores, strict=True)]


class RewardWorker:
    """Ray Data callable class: builds the sampler and the reward model once per actor,
    then samples and scores each batch (columns sample_id, persona, context). With
    `served` (a serve/roles.py Endpoint) the reward model is the served app."""

    def __init__(self, policy: dict[str, Any], n: int, backend: str, reward: dict[str, Any],
                 served: Endpoint | None = None) -> None:
        from actors.engines import EngineCache
        from actors.policy_sampler import PolicySampler
        from actors.reward_model import RewardModel
        from serve.roles import ServedRewardModel

        engines = EngineCache()  # policy and judge-backend reward model: one copy if the same model
        self.sampler = PolicySampler(policy, n, engine=engines.get(policy))
        self.reward_model = ServedRewardModel(served) if served is not None else RewardModel(
            backend, reward, engine=engines.get(reward) if backend == "judge" else None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = sample_and_score(self.sampler, self.reward_model, batch.column("persona").to_pylist(),
                                batch.column("context").to_pylist())
        return pa.table({
            "sample_id": batch.column("sample_id"),
            "prompt": pa.array([r["prompt"] for r in rows], MESSAGES),
            "candidates": pa.array([r["candidates"] for r in rows], pa.list_(pa.string())),
            "scores": pa.array([r["scores"] for r in rows], pa.list_(pa.float32())),
        })


# --- 4. pair selection and threshold ------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """Best versus worst of one prompt's candidates; `reason` says why there is no pair."""

    chosen: int | None
    rejected: int | None
    margin: float | None
    reason: str | None


def select_pair(candidates: Sequence[str], scores: Sequence[float]) -> Selection:
    """The highest-scored candidate (chosen) against the lowest (rejected), first index on
    ties; `reason` is set when they cannot make a pair, before any threshold."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    if len(scores) < 2:
        return Selection(None, None, None, TOO_FEW_CANDIDATES)
    if not all(math.isfinite(s) for s in scores):
        return Selection(None, None, None, INVALID_SCORES)
    if len({c.strip() for c in candidates}) == 1:
        return Selection(None, None, float(max(scores) - min(scores)), IDENTICAL_CANDIDATES)
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    margin = float(scores[best] - scores[worst])
    if margin <= 0:
        return Selection(None, None, margin, TIED_SCORES)
    if candidates[best].strip() == candidates[worst].strip():
        return Selection(best, worst, margin, IDENTICAL_CANDIDATES)
    if not candidates[best].strip() or not candidates[worst].strip():
        return Selection(best, worst, margin, EMPTY_CANDIDATE)
    return Selection(best, worst, margin, None)


def pooled_std(score_lists: Sequence[Sequence[float]]) -> float:
    """The reward model's typical spread within one prompt in this run: the square root of
    the mean within-prompt (population) variance. It carries the model's scale, so a margin
    divided by it reads the same for a judge in [0, 1] and a reward model's logits."""
    variances = []
    for scores in score_lists:
        if len(scores) >= 2:
            mean = sum(scores) / len(scores)
            variances.append(sum((s - mean) ** 2 for s in scores) / len(scores))
    return math.sqrt(sum(variances) / len(variances)) if variances else 0.0


def margin_zscore(margin: float, scale: float) -> float:
    """best - worst in units of the run's within-prompt spread (`pooled_std`); 0 if none."""
    return 0.0 if scale <= 0 else margin / scale


def quantile_cutoff(margins: Sequence[float], quantile: float) -> float:
    """The margin at `quantile` of this run's per-prompt margins (linear interpolation):
    margins at or above it are the top `1 - quantile`."""
    if not margins:
        return math.inf
    return float(pd.Series(margins, dtype="float64").quantile(quantile))


def apply_threshold(rows: list[dict[str, Any]], settings: RewardsConfig) -> list[dict[str, Any]]:
    """Set status, reason and margin on scored rows (candidates, scores); rows that already
    carry a reason (over_cap) are left filtered. Returns the same rows."""
    selections = {}
    for i, row in enumerate(rows):
        if row.get("reason"):
            continue
        selections[i] = select_pair(row["candidates"], row["scores"])
    cutoff, scale = None, pooled_std([rows[i]["scores"] for i, s in selections.items() if s.reason is None])
    if settings.threshold == "quantile":
        cutoff = quantile_cutoff([s.margin for s in selections.values() if s.reason is None], settings.quantile)
    for i, selection in selections.items():
        row, reason = rows[i], selection.reason
        if reason is None:
            passes = (margin_zscore(selection.margin, scale) >= settings.min_z if cutoff is None
                      else selection.margin >= cutoff)
            reason = None if passes else BELOW_THRESHOLD
        row["margin"] = selection.margin
        row["status"], row["reason"] = ("kept", None) if reason is None else ("filtered", reason)
        row["chosen_index"], row["rejected_index"] = \
            (selection.chosen, selection.rejected) if reason is None else (None, None)
    return rows


# --- the stage on Ray Data ----------------------------------------------------------------

def reward_model_spec(config: RunConfig) -> dict[str, Any]:
    """models.reward, or for backend `trained` the model this run's reward_model stage saved."""
    if config.rewards.backend != "trained":
        return config.models.reward.model_dump()
    folder = model_path(config.run_dir, "reward_model").resolve()
    return config.models.reward.model_copy(update={"id": str(folder)}).model_dump()


def score_with_ray(prompts: pd.DataFrame, config: RunConfig, policy: ModelSpec,
                   served: Endpoint | None = None) -> dict[str, dict[str, Any]]:
    """sample_id -> prompt, candidates, scores for every row of `prompts`, sampled from
    `policy`; scored by the server at `served`, else by a RewardModel in each actor."""
    import ray

    settings = config.rewards
    workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    batches = math.ceil(len(prompts) / settings.batch_size)
    table = pa.table({"sample_id": pa.array(prompts["sample_id"].tolist(), pa.string()),
                      "persona": pa.array(prompts["persona"].tolist(), pa.string()),
                      "context": pa.array(prompts["context"].tolist(), MESSAGES)})
    # Half a CPU per actor: a pool holding every CPU starves Ray Data's own tasks.
    # One block per batch, so every actor of the pool gets work.
    blocks = [table.slice(start, settings.batch_size) for start in range(0, table.num_rows, settings.batch_size)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        RewardWorker, batch_size=settings.batch_size, batch_format="pyarrow", num_cpus=0.5,
        num_gpus=actor_gpus(policy, None if served else reward_model_spec(config)),
        fn_constructor_kwargs={"policy": policy.model_dump(), "n": settings.n,
                               "backend": settings.backend, "reward": reward_model_spec(config),
                               "served": served},
        compute=ray.data.ActorPoolStrategy(size=min(workers, batches)))
    return {row["sample_id"]: row for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()}


def samples_rows(prompts: pd.DataFrame, scored: dict[str, dict[str, Any]], backend: str,
                 round_index: int) -> list[dict[str, Any]]:
    """One SAMPLES row per prompt; prompts that were not scored are `over_cap`."""
    rows = []
    for prompt in prompts.to_dict("records"):
        result = scored.get(prompt["sample_id"])
        rows.append({
            "sample_id": prompt["sample_id"], "user_id": prompt["user_id"], "persona_id": prompt["persona_id"],
            "conversation_id": prompt["conversation_id"], "turn_index": prompt["turn_index"],
            "prompt": result["prompt"] if result else [],
            "candidates": result["candidates"] if result else [],
            "scores": result["scores"] if result else [],
            "reward_backend": backend, "round": round_index,
            "status": None if result else "filtered", "reason": None if result else OVER_CAP, "margin": None,
            "chosen_index": None, "rejected_index": None,
        })
    return rows


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
    upstream = {name: require_stage(run_dir, name) for name in ("ingest", "followups", "personas")}
    policy = policy_spec(config, round_index)  # fails early when round k-1 exported no policy
    served = connect_reward_model(config)
    # Scores come from the server's RewardModel when served: its backend, on models.reward.
    backend = config.serve.reward.backend if served else settings.backend
    reward_spec = config.models.reward.model_dump() if served else None
    if settings.backend == "trained" and not served:
        upstream["reward_model"] = require_stage(run_dir, "reward_model")
    conversations = pq.read_table(table_path(run_dir, "ingest", "conversations"))
    followups = pq.read_table(table_path(run_dir, "followups", "followups"))
    found, covered = reward_prompts(conversations, followups, include_first_turns=settings.include_first_turns,
                                    include_no_feedback_turns=settings.include_no_feedback_turns)
    prompts = pd.DataFrame(found, columns=["conversation_id", "user_id", "turn_index", "time", "context", "first_turn"])
    prompts["sample_id"] = [sample_id(conversation, index, round_index)
                            for conversation, index in zip(prompts["conversation_id"], prompts["turn_index"])]
    prompts = attach_personas(prompts, run_dir, user_agnostic=config.ablation.user_agnostic)
    capped = prompts if settings.max_prompts is None else prompts.iloc[: settings.max_prompts]
    with StageWriter(run_dir, STAGE, round_index) as stage:
        scored = score_with_ray(capped, config, policy, served) if len(capped) else {}
        rows = apply_threshold(samples_rows(prompts, scored, backend, round_index), settings)
        samples = pa.Table.from_pylist(rows, schema=SAMPLES)
        check_schema(samples, SAMPLES, "samples")
        pq.write_table(samples, stage.table_dir("samples") / "part-0.parquet")
        reasons = Counter(r["reason"] for r in rows if r["status"] == "filtered")
        kept = sum(1 for r in rows if r["status"] == "kept")
        if kept + sum(reasons.values()) != len(prompts) or len(scored) != len(capped):
            raise RuntimeError(f"rewards lost prompts: {len(prompts)} prompts, {len(scored)} of "
                               f"{len(capped)} scored, {kept} kept, {sum(reasons.values())} filtered")
        summary = {
            "prompts": len(prompts), "first_turns": int(prompts["first_turn"].sum()),
            "no_feedback_turns": int((~prompts["first_turn"].astype(bool)).sum()),
            "turns_left_to_rewrites": covered, "sampled": len(scored), "kept": kept,
            "filtered": dict(sorted(reasons.items())),
            "candidates": sum(len(r["candidates"]) for r in rows),
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
