"""Stage `evaluate`: the last trained policy against the base policy (`rlhi eval`).

Four blocks, each naming the judge (or scorer) behind its numbers:

- **UserEval** (Jin et al. 2025, sec. 5): evaluation users' turns (split `eval`), first
  turns and follow-up turns (a user turn after an assistant answer; its context is the
  conversation up to and including it) reported apart. Both policies answer with
  persona-guided inference: base system prompt + the user's latest persona snapshot built
  strictly before the turn + the context (`PolicySampler.prompt`, greedy). The judge sees
  the persona too and compares the answers once per criterion (personalization,
  instruction following, overall), in both orders. Win / tie / loss with 95% intervals
  from a bootstrap over users, answer lengths, and a length-controlled win rate
  (pipelines/stages/evaluate/stats.py).
- **Reasoning**: GSM8K and MATH-500 accuracy of both arms by math-verify
  (pipelines/stages/evaluate/reasoning.py); intervals resample problems.
- **Arena-Hard v0.1**: both arms answer each question (no persona); judged overall.
- **Judge quality**: position consistency (share of comparisons whose two orders agree; the
  Judge calls the others ties) and accuracy on pairs with a known better answer: a gold
  GSM8K solution against the same solution with a wrong final number, and against the same
  solution's words shuffled and cut to half (nonsense). Rewrite pairs are not used: that
  the rewrite is better is the pipeline's assumption, not a known answer.

Generation and judging run in one process, batched by the engines: the stage is a few
hundred prompts, and on a GPU one vLLM engine per model batches them better than a pool.
That process is the driver when every model runs on CPU (or over HTTP), else one Ray task
holding a GPU (`runtime.in_ray_task`): on a cluster the driver runs on the head node, which
often has none.
What is asked (turns, benchmark items, known pairs) is built in pipelines/stages/evaluate/items.py.
Output: `<run_dir>/evaluate/summary.json` (with `arms` for the run report),
`judgements.jsonl` (one row per comparison) and `reasoning.jsonl` (one row per answer).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from actors.engines import GenerationEngine, SamplingParams, make_engine
from actors.judge import Judge
from actors.models import ModelSpec
from actors.policy_sampler import PolicySampler
from pipelines.stages.evaluate import reasoning
from pipelines.stages.evaluate import stats
from pipelines.config import RunConfig
from pipelines.stages.evaluate.items import EvalItem, benchmark_items, benchmark_path, known_pairs, user_turns
from pipelines.contract import StageWriter, fingerprint, require_stage
from pipelines.rounds import actor_gpus, ingest_rounds, last_train_round, policy_spec, upstream_round
from pipelines.runtime import in_ray_task
from pipelines.schema import stage_dir, step_name

STAGE = "evaluate"
# Each completes the judge prompt's "decide which of two candidate answers ...".
CRITERIA = {
    "personalization": "better fits this particular user: their persona, preferences, "
                       "background and style, as far as the conversation and persona show them",
    "instruction_following": "better follows the instructions in the user's last message "
                             "(what was asked, format, length and constraints)",
    "overall": None,   # the template's general criterion
}


@dataclass(frozen=True)
class Judgement:
    """One row of judgements.jsonl: answer a is the trained arm (or the known better one)."""

    block: str             # "usereval", "arena_hard" or "judge_check"
    kind: str
    criterion: str
    item_id: str
    user_id: str
    winner: str            # "a", "b" or "tie" (the two orders disagree)
    prob_a: float
    answer_a: str
    answer_b: str
    judge: str


# --- inputs -------------------------------------------------------------------------------

# --- the two arms -------------------------------------------------------------------------

@dataclass
class Arms:
    """The base and trained policies (greedy, so the arms differ by weights only) and the judge."""

    base: PolicySampler
    trained: PolicySampler
    judge_spec: ModelSpec
    judge_engine: GenerationEngine
    params: SamplingParams
    batch_size: int
    reason_tokens: int
    persona_in_prompt: bool   # False for user-agnostic runs: the policy saw no persona in training

    @property
    def judge_id(self) -> str:
        return self.judge_spec.id

    def judge(self, criterion: str) -> Judge:
        return Judge(self.judge_spec, engine=self.judge_engine, reason_tokens=self.reason_tokens,
                     criterion=CRITERIA[criterion])

    def answer(self, policy: PolicySampler, items: Sequence[EvalItem]) -> list[str]:
        """One greedy answer per item, with the persona block when the run uses personas; the
        prompt leaves room for evaluate.max_new_tokens, the length the answer may take."""
        texts: list[str] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            prompts = [policy.prompt(i.persona if self.persona_in_prompt else None, i.context,
                                     reserve_tokens=self.params.max_new_tokens).messages for i in chunk]
            texts += [out[0].text for out in policy.engine.generate(prompts, self.params)]
        return texts


def model_specs(config: RunConfig) -> dict[str, ModelSpec]:
    """The stage's models: "base" and "trained" policies and the "judge"."""
    return {"base": config.models.policy, "trained": policy_spec(config, last_train_round(config) + 1),
            "judge": config.models.judge}


def make_arms(config: RunConfig, engines: dict[str, GenerationEngine] | None = None) -> Arms:
    """Arms from the config; `engines` ("base", "trained", "judge") replaces any of them
    (tests, or a caller that already holds the models). Equal specs share one engine."""
    engines = dict(engines or {})
    specs = model_specs(config)
    loaded: dict[str, GenerationEngine] = {}
    for role, spec in specs.items():
        if role not in engines:
            key = spec.model_dump_json()
            engines[role] = loaded[key] = loaded.get(key) or make_engine(spec)
    settings = config.evaluate
    return Arms(base=PolicySampler(specs["base"], engine=engines["base"]),
                trained=PolicySampler(specs["trained"], engine=engines["trained"]),
                judge_spec=specs["judge"], judge_engine=engines["judge"],
                params=SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=0.0, seed=config.seed),
                batch_size=settings.batch_size, reason_tokens=settings.reason_tokens,
                persona_in_prompt=not config.ablation.user_agnostic)


# --- blocks -------------------------------------------------------------------------------

def judge_pairs(arms: Arms, block: str, criterion: str, items: Sequence[EvalItem],
                answers_a: Sequence[str], answers_b: Sequence[str]) -> list[Judgement]:
    """The judge's verdict on a vs b for each item (both orders, in batches)."""
    judge, rows = arms.judge(criterion), []
    for start in range(0, len(items), arms.batch_size):
        end = start + arms.batch_size
        chunk = items[start:end]
        verdicts = judge.compare_batch([i.persona or None for i in chunk], [i.context for i in chunk],
                                       answers_a[start:end], answers_b[start:end])
        rows += [Judgement(block, i.kind, criterion, i.item_id, i.user_id, v.winner, v.prob_a, a, b,
                           arms.judge_id)
                 for i, v, a, b in zip(chunk, verdicts, answers_a[start:end], answers_b[start:end])]
    return rows


def win_block(rows: Sequence[Judgement], *, samples: int, seed: int) -> dict[str, Any]:
    """Win rate (ties half) of a, its win / tie / loss shares and the judge's consistency."""
    users, winners = [r.user_id for r in rows], [r.winner for r in rows]
    return {"win_rate": stats.summarize([stats.win_score(w) for w in winners], users, samples=samples, seed=seed),
            **stats.outcome_shares(winners, users, samples=samples, seed=seed),
            "position_consistency": sum(w != "tie" for w in winners) / len(rows) if rows else None,
            "judge": rows[0].judge if rows else None}


def words(text: str) -> int:
    return len(text.split())


def user_eval(arms: Arms, items: Sequence[EvalItem], criteria: Sequence[str], *, samples: int,
              seed: int) -> tuple[dict[str, Any], list[Judgement]]:
    """One UserEval block (first or follow-up turns): trained is answer a, base answer b."""
    trained, base = arms.answer(arms.trained, items), arms.answer(arms.base, items)
    rows: list[Judgement] = []
    block: dict[str, Any] = {"turns": len(items), "users": len({i.user_id for i in items}),
                             "judge": arms.judge_id, "criteria": {}}
    for criterion in criteria:
        judged = judge_pairs(arms, "usereval", criterion, items, trained, base)
        rows += judged
        block["criteria"][criterion] = win_block(judged, samples=samples, seed=seed)
    trained_words, base_words = [words(t) for t in trained], [words(b) for b in base]
    block["lengths"] = {"trained_words": _mean(trained_words), "base_words": _mean(base_words),
                        "trained_tokens": _mean(_tokens(arms.trained, trained)),
                        "base_tokens": _mean(_tokens(arms.base, base))}
    overall = [r for r in rows if r.criterion == "overall"] or rows[:len(items)]
    if overall:
        block["length_controlled"] = {
            "criterion": overall[0].criterion, "judge": arms.judge_id,
            **stats.length_controlled([stats.win_score(r.winner) for r in overall], trained_words,
                                      base_words, [r.user_id for r in overall], samples=samples, seed=seed)}
    return block, rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _tokens(policy: PolicySampler, texts: Sequence[str]) -> list[int]:
    empty = policy.engine.count_tokens([{"role": "assistant", "content": ""}])
    return [policy.engine.count_tokens([{"role": "assistant", "content": t}]) - empty for t in texts]


def reasoning_block(arms: Arms, kind: str, pairs: Sequence[tuple[EvalItem, Any]], *, samples: int,
                    seed: int, path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy of both arms on one reasoning benchmark, scored by math-verify."""
    items = [item for item, _ in pairs]
    block: dict[str, Any] = {"problems": len(items), "path": path, "scorer": "math-verify"}
    rows = []
    for arm, policy in (("base", arms.base), ("trained", arms.trained)):
        correct = []
        for (item, problem), answer in zip(pairs, arms.answer(policy, items)):
            extracted, ok = reasoning.score(problem, answer, kind)
            correct.append(float(ok))
            rows.append({"benchmark": kind, "arm": arm, "item_id": item.item_id, "gold": problem.gold,
                         "extracted": extracted, "correct": ok, "answer": answer})
        block[arm] = stats.summarize(correct, [i.item_id for i in items], samples=samples, seed=seed)
    return block, rows


def judge_quality(arms: Arms, config: RunConfig, judged: Sequence[Judgement]) -> tuple[dict[str, Any], list[Judgement]]:
    """Position consistency over every comparison of the stage, and known-pair accuracy."""
    settings = config.evaluate
    pairs = known_pairs(settings.gsm8k, settings.judge_checks, config.seed) if settings.judge_checks else []
    checks = judge_pairs(arms, "judge_check", "overall", [p[0] for p in pairs],
                         [p[1] for p in pairs], [p[2] for p in pairs]) if pairs else []
    every = list(judged) + checks
    block: dict[str, Any] = {"judge": arms.judge_id, "comparisons": len(every),
                             "position_consistency": sum(r.winner != "tie" for r in every) / len(every)
                             if every else None, "known_pairs": {}}
    for kind in ("wrong_final", "scrambled"):
        rows = [r for r in checks if r.kind == kind]
        if rows:
            block["known_pairs"][kind] = {
                "accuracy": stats.summarize([stats.win_score(r.winner) for r in rows], [r.user_id for r in rows],
                                            samples=settings.bootstrap_samples, seed=config.seed),
                "strict_accuracy": sum(r.winner == "a" for r in rows) / len(rows)}
    if checks:
        block["known_pairs"]["all"] = stats.summarize([stats.win_score(r.winner) for r in checks],
                                                      [r.user_id for r in checks],
                                                      samples=settings.bootstrap_samples, seed=config.seed)
    return block, checks


# --- the stage ----------------------------------------------------------------------------

def report_arms(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The flat `arms` the run report reads: {name: {mean, ci_low, ci_high, n, judge}}."""
    arms: dict[str, dict[str, Any]] = {}

    def add(name: str, value: dict[str, Any] | None, judge: str | None) -> None:
        if value and value.get("n"):
            arms[name] = {k: value[k] for k in ("mean", "ci_low", "ci_high", "n")} | {"judge": judge}

    for kind, block in summary["usereval"].items():
        for criterion, result in block.get("criteria", {}).items():
            add(f"usereval_{kind}_{criterion}_win", result["win_rate"], block["judge"])
        add(f"usereval_{kind}_overall_win_lc", block.get("length_controlled"), block["judge"])
    for kind in ("gsm8k", "math500"):
        for arm in ("base", "trained"):
            add(f"{kind}_{arm}_acc", (summary.get(kind) or {}).get(arm), "math-verify")
    arena = summary.get("arena_hard") or {}
    add("arena_hard_overall_win", arena.get("win_rate"), arena.get("judge"))
    add("judge_known_pair_accuracy", summary["judge_quality"]["known_pairs"].get("all"),
        summary["judge_quality"]["judge"])
    return arms


def run_evaluate(config: RunConfig, engines: dict[str, GenerationEngine] | None = None) -> dict[str, Any]:
    """Run the stage into `<run_dir>/evaluate/`; returns its summary. `engines` (optional,
    keys "base", "trained", "judge") replaces the engines built from the config."""
    run_dir, settings = Path(config.run_dir), config.evaluate
    train_round = last_train_round(config)
    last = config.online.rounds
    personas_round = upstream_round(config, "personas", last)
    upstream = {**{step_name(k, "ingest"): require_stage(run_dir, "ingest", k) for k in ingest_rounds(config, last)},
                step_name(personas_round, "personas"): require_stage(run_dir, "personas", personas_round),
                "train": require_stage(run_dir, "train", train_round)}
    specs = model_specs(config)
    gpus = 0.0 if engines else actor_gpus(*specs.values())
    # On a cluster the driver runs on the head, which often has no GPU: a model that needs
    # one is loaded in a task that holds one.
    summary, judgements, reasoning_rows = (in_ray_task(measure, config, num_gpus=gpus) if gpus
                                           else measure(config, engines))

    with StageWriter(run_dir, STAGE) as stage:
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        _write_jsonl(stage.tmp / "judgements.jsonl", [asdict(j) for j in judgements])
        _write_jsonl(stage.tmp / "reasoning.jsonl", reasoning_rows)
        benchmarks = [benchmark_path(getattr(settings, k).path) for k in ("gsm8k", "math500", "arena_hard")
                      if getattr(settings, k).n or (k == "gsm8k" and settings.judge_checks)]
        stage.commit(config=config, inputs=fingerprint(benchmarks), upstream=upstream,
                     models=[{"role": role, "id": spec.id, "engine": spec.engine} for role, spec in specs.items()],
                     counts={"judgements": len(judgements), "reasoning_answers": len(reasoning_rows),
                             "arms": len(summary["arms"])})
    summary["output"] = str(stage_dir(run_dir, STAGE))
    return summary


def measure(config: RunConfig, engines: dict[str, GenerationEngine] | None = None
            ) -> tuple[dict[str, Any], list[Judgement], list[dict[str, Any]]]:
    """Every block of the stage: (summary, judgements, reasoning rows). Loads the models."""
    settings, seed = config.evaluate, config.seed
    arms = make_arms(config, engines)
    samples = settings.bootstrap_samples
    summary: dict[str, Any] = {
        "judge": {"id": arms.judge_id, "engine": arms.judge_spec.engine},
        "policies": {"base": arms.base.spec.id, "trained": arms.trained.spec.id,
                     "train_round": last_train_round(config)},
        "usereval": {}}
    judgements: list[Judgement] = []
    if settings.max_turns:
        for kind, items in user_turns(config).items():
            if items:
                summary["usereval"][kind], rows = user_eval(arms, items, settings.criteria, samples=samples, seed=seed)
                judgements += rows
    reasoning_rows: list[dict[str, Any]] = []
    for kind in ("gsm8k", "math500"):
        bench = getattr(settings, kind)
        if bench.n:
            summary[kind], rows = reasoning_block(arms, kind, benchmark_items(kind, bench, seed),
                                                  samples=samples, seed=seed, path=bench.path)
            reasoning_rows += rows
    if settings.arena_hard.n:
        items = [item for item, _ in benchmark_items("arena_hard", settings.arena_hard, seed)]
        rows = judge_pairs(arms, "arena_hard", "overall", items, arms.answer(arms.trained, items),
                           arms.answer(arms.base, items))
        summary["arena_hard"] = {"questions": len(items), "path": settings.arena_hard.path,
                                 **win_block(rows, samples=samples, seed=seed)}
        judgements += rows
    summary["judge_quality"], checks = judge_quality(arms, config, judgements)
    judgements += checks
    return {"arms": report_arms(summary), **summary}, judgements, reasoning_rows


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, default=str) + "\n" for row in rows))
