"""The driver: run a configuration's stages in order, then its online rounds.

    python -m pipelines.driver --config FILE [--out RUN_DIR] [--from STEP | --only STEP] [--dry-run] [--json]

(the same as `rlhi run`). Round 0 runs `config.stages` (ingest, followups, personas,
rewrites, reward_model, rewards, pairs, train); online round k = 1..online.rounds reruns
`online.stages` with the policy round k-1 trained, writing under `<run_dir>/round-<k>/`.
`--dry-run` starts nothing: it prints the plan and the per-GPU memory estimate of each
training setting (pipelines/stages/train/memory.py).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.config import RunConfig
from pipelines.stages.ingest.sources import resolve_inputs

ROUND_STAGES = ("rewrites", "rewards", "pairs", "train")


def stage_runners() -> dict[str, Callable[..., dict[str, Any]]]:
    """Stage name -> runner(config[, round_index]); imported lazily (some pull in torch)."""
    from pipelines.stages.evaluate.stage import run_evaluate
    from pipelines.stages.followups import run_followups
    from pipelines.stages.ingest.stage import run_ingest
    from pipelines.stages.pairs import run_pairs
    from pipelines.stages.personas import run_personas
    from pipelines.stages.train_reward_model import run_reward_model
    from pipelines.stages.rewards import run_rewards
    from pipelines.stages.rewrites.stage import run_rewrites
    from pipelines.stages.train.stage import run_train

    return {"ingest": run_ingest, "followups": run_followups, "personas": run_personas,
            "rewrites": run_rewrites, "reward_model": run_reward_model, "rewards": run_rewards,
            "pairs": run_pairs, "train": run_train, "evaluate": run_evaluate}


def plan(config: RunConfig) -> list[tuple[int, str]]:
    """(round, stage) in the order they run; evaluate comes last, after the online rounds,
    so it judges the newest policy."""
    steps = [(0, stage) for stage in config.stages if stage != "evaluate"]
    for k in range(1, config.online.rounds + 1):
        steps += [(k, stage) for stage in config.online.stages]
    if "evaluate" in config.stages:
        steps.append((0, "evaluate"))
    return steps


def step_name(round_index: int, stage: str) -> str:
    return stage if round_index == 0 else f"round-{round_index}/{stage}"


def ingest_lines(summary: dict[str, Any]) -> list[str]:
    reasons = lambda counts: ", ".join(f"{n} {k}" for k, n in counts.items()) or "none"  # noqa: E731
    per_user = summary["conversations_per_user"]
    return [
        f"ingest: {summary['rows_in']} rows in, {summary['kept']} kept, "
        f"{sum(summary['filtered'].values())} filtered, {sum(summary['rejected'].values())} rejected",
        f"  filtered: {reasons(summary['filtered'])}",
        f"  rejected: {reasons(summary['rejected'])}",
        f"  users: {summary['users']} (conversations per user: min {per_user['min']}, "
        f"median {per_user['median']}, max {per_user['max']})",
        f"  redacted: {reasons(summary['redacted'])}",
        *(f"  skipped bad file: {bad['error']}" for bad in summary["bad_files"]),
        f"  output: {summary['output']}",
    ]


def evaluate_lines(summary: dict[str, Any]) -> list[str]:
    arms = summary.get("arms", {})
    lines = [f"evaluate: judge {summary.get('judge', {}).get('id')}"]
    lines += [f"  {name}: {arm['mean']:.3f} [{arm['ci_low']:.3f}, {arm['ci_high']:.3f}]"
              for name, arm in arms.items() if arm.get("mean") is not None]
    return lines


def stage_line(name: str, summary: dict[str, Any]) -> str:
    shown = {k: v for k, v in summary.items()
             if k not in ("output", "backend", "policy", "pairs_per_epoch", "checkpoints")
             and not isinstance(v, (dict, list))}
    return f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + f"\n  output: {summary.get('output')}"


# What each stage's output depends on, besides the steps before it in the plan.
STAGE_SETTINGS = {
    "ingest": ["ingest"],
    "followups": ["followups", "models.classifier"],
    "personas": ["personas", "models.persona"],
    "rewrites": ["rewrites", "ablation", "models.policy", "models.rewriter", "models.judge"],
    "reward_model": ["reward_model"],
    "rewards": ["rewards", "ablation", "models.policy", "models.reward", "serve.reward"],
    "pairs": ["train.sources", "ablation"],
    "train": ["train", "models.policy"],
    "evaluate": ["evaluate", "ablation", "models.policy", "models.judge"],
}


def _setting(config: RunConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def step_key(config: RunConfig, round_index: int, stage: str, previous: str | None) -> str:
    """A hash of what one step's output depends on: its settings, the seed, the round, its
    inputs' content (ingest) and the key of the step before it. Chaining the keys along the
    plan makes a change rerun that step and every step after it."""
    from pipelines.contract import fingerprint

    data: dict[str, Any] = {"stage": stage, "round": round_index, "seed": config.seed, "previous": previous,
                            **{name: _setting(config, name) for name in STAGE_SETTINGS[stage]}}
    if stage == "ingest":
        data["inputs"] = [(f["path"], f["sha256"]) for f in fingerprint(resolve_inputs(config.ingest.inputs))]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_dir(config: RunConfig, round_index: int) -> Path:
    from pipelines.rounds import round_dir

    return round_dir(config.run_dir, round_index)


def select_steps(config: RunConfig, start: str | None, only: str | None) -> list[tuple[int, str, str]]:
    """(round, stage, mode) per planned step; mode is "auto" (skip when current), "force",
    or "keep" (before --from: reuse what is there)."""
    steps = plan(config)
    names = [step_name(k, s) for k, s in steps]
    for flag, wanted in (("--from", start), ("--only", only)):
        if wanted is not None and wanted not in names:
            raise ValueError(f"{flag} {wanted}: not a step of this configuration's plan; the plan is "
                             + ", ".join(names))
    out = []
    for (k, stage), name in zip(steps, names):
        if only is not None:
            if name == only:
                out.append((k, stage, "force"))
        elif start is not None:
            out.append((k, stage, "keep" if names.index(name) < names.index(start) else "force"))
        else:
            out.append((k, stage, "auto"))
    return out


def run_pipeline(config: RunConfig, *, start: str | None = None, only: str | None = None,
                 report: bool = True) -> dict[str, Any]:
    """Run the planned steps on Ray, skipping those whose output is current; returns
    {"run_dir", "report", "stages": {name: {"status", "seconds", "counts", "output"}}}."""
    from pipelines.tools.forget import reapply_forgets
    from pipelines.metrics import export_stage_metrics
    from pipelines.runtime import start_ray
    from pipelines.contract import RUN_KEY, STEP_STARTED, read_manifest

    steps = select_steps(config, start, only)
    if any(stage == "ingest" for _, stage, mode in steps if mode != "keep"):
        resolve_inputs(config.ingest.inputs)  # a missing input fails before Ray starts
    dashboard = start_ray(config.resources)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)
    runners = stage_runners()
    results: dict[str, Any] = {}
    previous, dirty = None, False
    for round_index, stage, mode in steps:
        name = step_name(round_index, stage)
        key = step_key(config, round_index, stage, previous)
        previous = key
        manifest = read_manifest(step_dir(config, round_index), stage)
        current = manifest is not None and manifest.get("run_key") == key
        if mode == "keep" or (mode == "auto" and current and not dirty):
            if manifest is None:
                raise RuntimeError(f"--from: step {name} before it has not finished; run without --from first")
            results[name] = {"status": "skipped", "seconds": 0.0, "counts": manifest["counts"],
                             "output": str(step_dir(config, round_index) / stage)}
            print(f"[{name}] skipped: its output matches its settings and inputs"
                  + ("" if current else " (kept by --from)"), flush=True)
            continue
        dirty = True
        print(f"[{name}] starting", flush=True)
        started = time.time()
        token, clock = RUN_KEY.set(key), STEP_STARTED.set(started)
        try:
            runner = runners[stage]
            summary = runner(config, round_index) if stage in ROUND_STAGES else runner(config)
        finally:
            RUN_KEY.reset(token)
            STEP_STARTED.reset(clock)
        output = summary.pop("output", None)
        if output and (removed := reapply_forgets(Path(config.run_dir), Path(output))):
            print(f"[{name}] removed {removed} rows of users forgotten earlier (forget.jsonl)", flush=True)
        seconds = round(time.time() - started, 1)
        results[name] = {"status": "ran", "seconds": seconds, "counts": summary, "output": output}
        export_stage_metrics(stage, round_index, summary)
        lines = ingest_lines({**summary, "output": output}) if stage == "ingest" \
            else evaluate_lines(summary) if stage == "evaluate" \
            else [stage_line(name, {**summary, "output": output})]
        print("\n".join(lines) + f"\n[{name}] done in {seconds:.1f} s", flush=True)
    out: dict[str, Any] = {"run_dir": str(Path(config.run_dir).resolve()), "report": None, "stages": results}
    if report and importlib.util.find_spec("pipelines.tools.report") is not None:
        from pipelines.tools.report import write_report

        out["report"] = str(write_report(Path(config.run_dir), results).resolve())
        print(f"report: {out['report']}", flush=True)
    return out


def dry_run(config: RunConfig) -> dict[str, Any]:
    """The plan and the training memory estimates; starts nothing."""
    from pipelines.stages.train.memory import memory_report

    out: dict[str, Any] = {"run_dir": str(Path(config.run_dir).resolve()),
                           "plan": [step_name(k, s) for k, s in plan(config)]}
    if "train" in config.stages or (config.online.rounds and "train" in config.online.stages):
        settings = config.train
        bf16 = settings.bf16 if settings.bf16 is not None else settings.gpus_per_worker > 0
        out["train_memory"] = memory_report(settings, config.models.policy.id,
                                            settings.gpu_memory_gib, bf16=bf16)
    return out


def format_dry_run(report: dict[str, Any]) -> str:
    lines = [f"run_dir: {report['run_dir']}", "plan: " + " -> ".join(report["plan"])]
    memory = report.get("train_memory")
    if memory:
        lines.append(f"train memory per GPU (GiB), {memory['model']} ({memory['params_billion']}B params, "
                     f"sizes from {memory['sizes_from']}), {memory['gpus']} GPU(s), "
                     f"{'bf16' if memory['bf16'] else 'fp32'}:")
        columns = ["weights", "gradients", "optimizer", "reference", "activations", "logits", "total"]
        lines.append(f"  {'setting':32s}" + "".join(f"{c:>12s}" for c in columns) + ("   fits" if memory["gpu_gib"] else ""))
        for row in memory["settings"]:
            fits = f"   {'yes' if row['fits'] else 'NO'}" if "fits" in row else ""
            lines.append(f"  {row['setting']:32s}" + "".join(f"{row[c]:12.2f}" for c in columns) + fits)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.driver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, metavar="FILE")
    parser.add_argument("--out", metavar="RUN_DIR")
    parser.add_argument("--from", dest="start", metavar="STEP")
    parser.add_argument("--only", metavar="STEP")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", action="store_true")
    from pipelines.cli import main as cli_main

    args = parser.parse_args(argv)
    forwarded = ["run", "--config", args.config] + (["--out", args.out] if args.out else [])
    forwarded += (["--from", args.start] if args.start else []) + (["--only", args.only] if args.only else [])
    forwarded += (["--dry-run"] if args.dry_run else []) + (["--json"] if args.json else [])
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
