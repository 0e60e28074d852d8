"""How the command line shows a stage's summary and the dry-run plan (text only).

Used by the driver (a line per step as it runs) and by the `rlhi` commands.
"""
from __future__ import annotations

from typing import Any


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


def format_dry_run(report: dict[str, Any]) -> str:
    lines = [f"run_dir: {report['run_dir']}", "plan: " + " -> ".join(report["plan"])]
    lines += [f"  {step} reads {', '.join(reads) or 'its inputs'}" for step, reads in report.get("reads", {}).items()]
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


def step_lines(stage: str, name: str, summary: dict[str, Any]) -> list[str]:
    """The lines the driver prints when step `name` (of `stage`) finishes."""
    if stage == "ingest":
        return ingest_lines(summary)
    if stage == "evaluate":
        return evaluate_lines(summary)
    return [stage_line(name, summary)]
