"""Stage `rewrites`: feedback follow-ups -> (rewrite, rejected) pairs, each kept or filtered.

User-guided rewrites, on-policy as in the paper (Jin et al. 2025, "RLHI", source 1 of
DESIGN.md): for each follow-up whose label carries feedback, the round's policy re-answers
the context (one sample at T=0.6, top-p 0.9, seeded), the Rewriter revises that answer
using the follow-up and the persona, and the pair is rewrite = chosen, regenerated answer =
rejected. `rewrites.rejected: original` takes the logged answer as rejected instead.

The row's `prompt` is the policy's own prompt (base system prompt + persona block + the
context up to the user turn the answer responds to): the DPO prompt. The follow-up never
enters it (`check_prompt`, per row), and neither does it enter the persona: the persona is
the snapshot built from the user's conversations before this one (`attach_personas`), so
the DPO prompt never states the feedback the pair was built from.

Top to bottom: read the eligible follow-ups and their personas, mark those over the cap,
run `rewrite_rows` batch by batch in a Ray Data actor pool (sampler, rewriter and judge
built once per actor), filter with pipelines/stages/rewrites/quality.py; each actor writes
its batch's rows as a part of the unfinished output and returns only counts, from which the
driver checks that every follow-up got a row.

With `rewrites.rewriter_via: serve` the actors send the rewrites to the running `rlhi
serve` app (serve/roles.py ServedRewriter, POST /v1/rewrite) instead of loading the
rewriter; the stage checks the server is healthy before any actor starts. The policy
sampler stays in the pool: the chat app would condition on the user's serving persona,
built from ALL their history, leaking later conversations into earlier turns' prompts.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.stages.rewrites import quality
from pipelines.config import RewritesConfig, RunConfig
from pipelines.persona_join import attach_personas
from pipelines.rounds import actor_gpus, new_turns, policy_spec, upstream_round
from pipelines.schema import FOLLOWUPS, REWRITES, check_schema, stage_dir, table_path
from pipelines.contract import BATCH, StageWriter, batch_part_name, numbered_batches, require_stage

if TYPE_CHECKING:
    from serve.roles import Endpoint

STAGE = "rewrites"
OVER_CAP = "over_cap"          # beyond rewrites.max_followups: no model calls
NO_USER_TURN = "no_user_turn"  # the context does not end with the user turn answered
# Columns of the follow-ups fed to the workers (a follow-up plus its persona).
INPUT = pa.schema([*(FOLLOWUPS.field(n) for n in ("followup_id", "conversation_id", "user_id", "turn_index",
                                                  "context", "answer", "message", "label")),
                   ("persona_id", pa.string()), ("persona", pa.string())])


# --- one batch, plain Python (tested without Ray) -------------------------------------------

def check_prompt(prompt: Sequence[dict], context: Sequence[dict], message: str, followup_id: str) -> None:
    """Raise unless `prompt` is a policy prompt of `context`: a system message, then the
    context's last turns (older ones may be dropped to fit), ending with the user turn the
    answer responds to, and the follow-up nowhere as a message of its own. A follow-up that
    repeats a context turn word for word may appear as often as it does in the context."""
    turns = list(prompt[1:])
    problem = None
    if not prompt or prompt[0]["role"] != "system":
        problem = "does not start with the system prompt"
    elif not turns or turns[-1]["role"] != "user":
        problem = "does not end with a user turn"
    elif len(turns) > len(context) or [t["role"] for t in turns] != [t["role"] for t in context[len(context) - len(turns):]]:
        problem = "is not the end of the context"
    elif sum(t["content"] == message for t in turns) > sum(t["content"] == message for t in context):
        problem = "contains the follow-up message"
    if problem:
        raise ValueError(f"follow-up {followup_id}: the DPO prompt {problem}; the prompt must be "
                         "the policy prompt of the context before the answer (pipelines/stages/rewrites/stage.py)")


def rewrite_rows(rows: Sequence[dict[str, Any]], *, sampler, rewriter, judge,
                 tokenize: quality.Tokenize, settings: RewritesConfig, from_scratch: bool = False,
                 round_index: int = 0) -> list[dict[str, Any]]:
    """REWRITES rows for one batch of follow-ups (INPUT columns): sample the rejected answer
    (or take the logged one), rewrite it, run the quality filter; the judge only sees pairs
    that passed the cheap checks. `judge` may be None when settings.filter.judge is off.
    A follow-up whose context does not end with a user turn has no request the policy could
    re-answer: it is filtered (`no_user_turn`) without model calls."""
    unanswerable = [output_row(r, prompt=None, chosen=None, rejected=None, margin=None, reason=NO_USER_TURN,
                               settings=settings, round_index=round_index)
                    for r in rows if not ends_with_user_turn(r["context"])]
    rows = [r for r in rows if ends_with_user_turn(r["context"])]
    if not rows:
        return unanswerable
    personas = [r["persona"] or None for r in rows]
    contexts = [list(r["context"]) for r in rows]
    if settings.rejected == "regenerated":
        samples = sampler.sample_batch(personas, contexts)
        prompts, rejected = [s.prompt for s in samples], [s.candidates[0].strip() for s in samples]
    else:
        prompts, rejected = [sampler.prompt(p, c).messages for p, c in zip(personas, contexts)], [r["answer"] for r in rows]
    for row, prompt, context in zip(rows, prompts, contexts):
        check_prompt(prompt, context, row["message"], row["followup_id"])
    # From scratch (ablation): the rewriter is not shown the follow-up.
    messages = [None if from_scratch else r["message"] for r in rows]
    out = rewriter.rewrite_batch(personas, contexts, rejected, messages)
    rewrites = [r.text for r in out]
    reasons = [quality.cheap_reason(r.text, j, tokenize, settings.filter, truncated=r.finish_reason == "length")
               for r, j in zip(out, rejected)]
    margins: list[float | None] = [None] * len(rows)
    if settings.filter.judge:
        passed = [i for i, reason in enumerate(reasons) if reason is None]
        scored = quality.judge_margins(judge, [personas[i] for i in passed], [contexts[i] for i in passed],
                                       [rewrites[i] for i in passed], [rejected[i] for i in passed])
        for i, margin in zip(passed, scored):
            margins[i] = margin
            if quality.below_margin(margin, settings.filter):
                reasons[i] = "below_margin"
    return [output_row(row, prompt=[dict(m) for m in prompt], chosen=c, rejected=j, margin=m, reason=reason,
                       settings=settings, round_index=round_index)
            for row, prompt, c, j, m, reason in zip(rows, prompts, rewrites, rejected, margins, reasons)] + unanswerable


def ends_with_user_turn(context: Sequence[dict] | None) -> bool:
    return bool(context) and context[-1]["role"] == "user"


def output_row(row: dict[str, Any], *, prompt: list[dict] | None, chosen: str | None, rejected: str | None,
               margin: float | None, reason: str | None, settings: RewritesConfig, round_index: int) -> dict[str, Any]:
    return {"followup_id": row["followup_id"], "conversation_id": row["conversation_id"], "user_id": row["user_id"],
            "persona_id": row["persona_id"], "turn_index": row["turn_index"], "prompt": prompt, "chosen": chosen,
            "rejected": rejected, "rejected_source": settings.rejected, "label": row["label"], "margin": margin,
            "status": "kept" if reason is None else "filtered", "reason": reason, "round": round_index}


# --- the stage on Ray Data ------------------------------------------------------------------

class RewriteWorker:
    """Ray Data callable class: the policy sampler, rewriter, judge and tokenizer, built once
    per actor; each call turns one batch of follow-ups into REWRITES rows written as a part
    of the stage's unfinished output (`out`). With `served` (a serve/roles.py Endpoint) the
    rewriter is the served app, not a local model."""

    def __init__(self, policy: dict[str, Any], rewriter: dict[str, Any], judge: dict[str, Any] | None,
                 settings_json: str, from_scratch: bool, round_index: int, out: str,
                 served: Endpoint | None = None) -> None:
        from actors.engines import EngineCache
        from actors.judge import Judge
        from actors.models import load_tokenizer
        from actors.policy_sampler import PolicySampler
        from actors.rewriter import Rewriter
        from serve.roles import ServedRewriter

        self.settings = RewritesConfig.model_validate_json(settings_json)
        self.from_scratch, self.round_index, self.out = from_scratch, round_index, Path(out)
        engines = EngineCache()  # one copy of a model that plays several roles
        self.sampler = PolicySampler(policy, n=1, engine=engines.get(policy))
        self.rewriter = ServedRewriter(served) if served is not None \
            else Rewriter(rewriter, engine=engines.get(rewriter))
        self.judge = Judge(judge, engine=engines.get(judge), reason_tokens=0) \
            if judge is not None else None  # the margin only: no reason generated
        # Token counts for the filter are the policy's: it is what DPO trains on them.
        tokenizer = load_tokenizer(self.sampler.spec)
        self.tokenize: Callable[[str], list[int]] = lambda text: tokenizer.encode(text, add_special_tokens=False)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rewrite one batch, write it as the part named after its batch number, and return
        only its counts (no row passes through the driver)."""
        rows = rewrite_rows(batch.drop_columns([BATCH]).to_pylist(), sampler=self.sampler, rewriter=self.rewriter,
                            judge=self.judge, tokenize=self.tokenize, settings=self.settings,
                            from_scratch=self.from_scratch, round_index=self.round_index)
        table = pa.Table.from_pylist(rows, schema=REWRITES)
        pq.write_table(table, self.out / batch_part_name(batch))
        return pa.table({"counts": [json.dumps(part_counts(table))]})


def eligible_followups(config: RunConfig, round_index: int = 0) -> pa.Table:
    """Follow-ups whose label is in rewrites.labels (in a served_logs round: new ones only),
    by conversation and turn, with the persona each one sees (INPUT columns)."""
    run_dir = Path(config.run_dir)
    followups = pq.read_table(table_path(run_dir, "followups", "followups",
                                         upstream_round(config, "followups", round_index)), schema=FOLLOWUPS)
    followups = followups.filter(pc.is_in(followups.column("label"), pa.array(config.rewrites.labels)))
    fresh = new_turns(config, round_index, followups.column("conversation_id").to_pylist(),
                      followups.column("turn_index").to_pylist())
    followups = followups.filter(pa.array(fresh, pa.bool_()))
    followups = followups.sort_by([("conversation_id", "ascending"), ("turn_index", "ascending")])
    frame = followups.select(["user_id", "conversation_id"]).to_pandas()
    frame = attach_personas(frame, run_dir, user_agnostic=config.ablation.user_agnostic,
                            round_index=upstream_round(config, "personas", round_index))
    table = followups.append_column("persona_id", pa.array(list(frame["persona_id"]), pa.string())) \
                     .append_column("persona", pa.array(list(frame["persona"]), pa.string()))
    return table.select(INPUT.names).cast(INPUT)


def rewrite_with_ray(todo: pa.Table, config: RunConfig, round_index: int, out: Path,
                     served: Endpoint | None = None) -> list[dict[str, Any]]:
    """Run RewriteWorker over `todo` in an actor pool, `rewrites.batch_size` rows a call,
    each batch written by its actor as `out/part-<batch>.parquet`; returns the parts' counts.
    `served`: the serve/roles.py Endpoint that rewrites, else each actor loads the rewriter."""
    import ray

    settings = config.rewrites
    batches = -(-todo.num_rows // settings.batch_size)
    workers = settings.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # One block per batch, so the whole pool gets work and a batch is the same rows on
    # every rerun (sampling is seeded per engine call). Half a CPU per actor: a pool
    # holding every CPU would starve Ray Data's own tasks.
    blocks = numbered_batches(todo, settings.batch_size)
    gpus = actor_gpus(policy_spec(config, round_index), None if served else config.models.rewriter,
                      config.models.judge if settings.filter.judge else None)
    results = ray.data.from_arrow(blocks).map_batches(
        RewriteWorker, fn_constructor_kwargs={
            "policy": policy_spec(config, round_index).model_dump(), "rewriter": config.models.rewriter.model_dump(),
            "judge": config.models.judge.model_dump() if settings.filter.judge else None,
            "settings_json": settings.model_dump_json(), "from_scratch": config.ablation.rewrites_from_scratch,
            "round_index": round_index, "out": str(out), "served": served},
        batch_size=settings.batch_size, batch_format="pyarrow", num_cpus=0.5, num_gpus=gpus,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, batches))))
    return [json.loads(text) for batch in results.iter_batches(batch_format="pyarrow", batch_size=None)
            for text in batch.column("counts").to_pylist()]


def part_counts(table: pa.Table) -> dict[str, Any]:
    """What the summary needs of one part: rows by status, reason and label."""
    rows = table.select(["status", "reason", "label"]).to_pylist()
    return {"rows": len(rows), "kept": sum(r["status"] == "kept" for r in rows),
            "filtered": dict(Counter(r["reason"] for r in rows if r["status"] == "filtered")),
            "labels": {label: dict(Counter(r["status"] for r in rows if r["label"] == label))
                       for label in sorted({r["label"] for r in rows})}}


def summarize(parts: list[dict[str, Any]], followups_in: int, seconds: float, round_index: int,
              rejected: str) -> dict[str, Any]:
    """The stage summary from its parts' counts; an error if any follow-up is unaccounted for."""
    kept = sum(part["kept"] for part in parts)
    filtered, by_label = Counter(), {}
    for part in parts:
        filtered.update(part["filtered"])
        for label, statuses in part["labels"].items():
            by_label.setdefault(label, Counter()).update(statuses)
    if kept + sum(filtered.values()) != followups_in or sum(part["rows"] for part in parts) != followups_in:
        raise RuntimeError(f"rewrites lost follow-ups: {followups_in} in, {kept} kept, "
                           f"{sum(filtered.values())} filtered")
    return {"round": round_index, "followups_in": followups_in, "kept": kept,
            "filtered": dict(sorted(filtered.items())),
            "labels": {k: dict(v) for k, v in sorted(by_label.items())},
            "rejected_source": rejected, "seconds": round(seconds, 3)}


def connect_rewriter(config: RunConfig) -> Endpoint | None:
    """The serve/roles.py Endpoint when rewrites.rewriter_via is serve (checked healthy
    now, before any actor starts), else None."""
    if config.rewrites.rewriter_via != "serve":
        return None
    if config.ablation.rewrites_from_scratch:
        raise ValueError("ablation.rewrites_from_scratch hides the follow-up from the rewriter, "
                         "but POST /v1/rewrite requires it: set rewrites.rewriter_via: pool")
    from serve.roles import connect

    return connect(config)


def run_rewrites(config: RunConfig, round_index: int = 0) -> dict[str, Any]:
    """Run the stage into `<round_dir>/rewrites/`; returns its summary. Every eligible
    follow-up gets a row: kept, or filtered with its reason."""
    started = time.time()
    run_dir, settings = Path(config.run_dir), config.rewrites
    upstream = {name: require_stage(run_dir, name, upstream_round(config, name, round_index))
                for name in ("followups", "personas")}
    policy_spec(config, round_index)  # fails early when round k-1 exported no policy
    served = connect_rewriter(config)
    eligible = eligible_followups(config, round_index)
    cap = settings.max_followups if settings.max_followups is not None else eligible.num_rows
    todo, over = eligible.slice(0, cap), eligible.slice(cap)
    skipped = pa.Table.from_pylist(
        [output_row(r, prompt=None, chosen=None, rejected=None, margin=None, reason=OVER_CAP,
                    settings=settings, round_index=round_index) for r in over.to_pylist()], schema=REWRITES)
    with StageWriter(run_dir, STAGE, round_index) as stage:
        out = stage.table_dir("rewrites")
        parts = rewrite_with_ray(todo, config, round_index, out, served) if todo.num_rows else []
        # Follow-ups over the cap: ids and status only, in a part of their own.
        check_schema(skipped, REWRITES, "rewrites")
        pq.write_table(skipped, out / "part-over-cap.parquet")
        summary = summarize(parts + [part_counts(skipped)], eligible.num_rows, time.time() - started,
                            round_index, settings.rejected)
        summary["rewriter_via"] = settings.rewriter_via
        if served is not None:
            summary["serve_url"] = served.url
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        models = [policy_spec(config, round_index), config.models.rewriter]
        models += [config.models.judge] if settings.filter.judge else []
        stage.commit(config=config, upstream=upstream, models=[m.model_dump() for m in models], counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE, round_index))
    return summary
