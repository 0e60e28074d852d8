"""The driver: run a configuration's stages in order, then its online rounds.

    python -m pipelines.driver --config FILE [--out RUN_DIR] [--dry-run] [--json]

(the same as `rlhi run`). Round 0 runs `config.stages` (ingest, followups, personas,
rewrites, reward_model, rewards, pairs, train); online round k = 1..online.rounds reruns
`online.stages` with the policy round k-1 trained, writing under `<run_dir>/round-<k>/`.
`--dry-run` starts nothing: it prints the plan and the per-GPU memory estimate of each
training setting (pipelines/train_memory.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from pipelines.config import RunConfig
from pipelines.sources import resolve_inputs

ROUND_STAGES = ("rewrites", "rewards", "pairs", "train")


def stage_runners() -> dict[str, Callable[..., dict[str, Any]]]:
    """Stage name -> runner(config[, round_index]); imported lazily (some pull in torch)."""
    from pipelines.followups import run_followups
    from pipelines.ingest import run_ingest
    from pipelines.pairs import run_pairs
    from pipelines.personas import run_personas
    from pipelines.reward_model import run_reward_model
    from pipelines.rewards import run_rewards
    from pipelines.rewrites import run_rewrites
    from pipelines.train import run_train

    return {"ingest": run_ingest, "followups": run_followups, "personas": run_personas,
            "rewrites": run_rewrites, "reward_model": run_reward_model, "rewards": run_rewards,
            "pairs": run_pairs, "train": run_train}


def plan(config: RunConfig) -> list[tuple[int, str]]:
    """(round, stage) in the order they run."""
    steps = [(0, stage) for stage in config.stages]
    for k in range(1, config.online.rounds + 1):
        steps += [(k, stage) for stage in config.online.stages]
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


def stage_line(name: str, summary: dict[str, Any]) -> str:
    shown = {k: v for k, v in summary.items()
             if k not in ("output", "backend", "policy", "pairs_per_epoch", "checkpoints")
             and not isinstance(v, (dict, list))}
    return f"{name}: " + ", ".join(f"{k} {v}" for k, v in shown.items()) + f"\n  output: {summary.get('output')}"


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run every planned stage on Ray; returns each step's summary by name."""
    from pipelines.runtime import start_ray

    if "ingest" in config.stages:
        resolve_inputs(config.ingest.inputs)  # a missing input fails before Ray starts
    start_ray(config.resources)
    runners = stage_runners()
    results: dict[str, Any] = {}
    for round_index, stage in plan(config):
        runner = runners[stage]
        summary = runner(config, round_index) if stage in ROUND_STAGES else runner(config)
        results[step_name(round_index, stage)] = summary
        name = step_name(round_index, stage)
        print("\n".join(ingest_lines(summary)) if stage == "ingest" else stage_line(name, summary), flush=True)
    return results


def dry_run(config: RunConfig) -> dict[str, Any]:
    """The plan and the training memory estimates; starts nothing."""
    from pipelines.train_memory import memory_report

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
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", action="store_true")
    from pipelines.cli import main as cli_main

    args = parser.parse_args(argv)
    forwarded = ["run", "--config", args.config] + (["--out", args.out] if args.out else [])
    forwarded += (["--dry-run"] if args.dry_run else []) + (["--json"] if args.json else [])
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
