"""The run report: one Markdown page and its PNG plots, written from a run directory.

`write_report(run_dir)` reads what the finished stages left (manifests, summaries and a
few columns of their Parquet tables) and writes `<run_dir>/report/report.md` with plots
beside it, linked by relative paths so the folder can be copied or rendered anywhere.
Each section appears for a stage that finished; a stage that did not says "not run".
It reads no model and starts no Ray, so it costs seconds, and it never raises for a
missing or unreadable optional table: the section says what was wrong instead.

Tables are counted from the Parquet files rather than the summaries, so a report written
after `rlhi forget` (pipelines/tools/forget.py) shows the rows that are left.

The evaluation section reads `<run_dir>/evaluate/summary.json` when the evaluate stage
has written it. The keys it understands:

    {"arms": {"<arm name>": {"mean": 0.62, "ci_low": 0.55, "ci_high": 0.69, ...}, ...}}

one row per arm: its win rate (`mean`) and the interval's bounds; any other numeric
field of an arm is shown in an extra column, and any missing one as "-".
"""
from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipelines.contract import MANIFEST  # noqa: E402
from pipelines.registry import ROUND_STAGES, STAGES  # noqa: E402
from pipelines.schema import FOLLOWUP_LABELS, planned_rounds, stage_dir, step_name, table_path  # noqa: E402

REPORT_DIR = "report"
NOT_RUN = "_not run_"


def write_report(run_dir: Path, stage_results: dict | None = None) -> Path:
    """Write `<run_dir>/report/report.md` and its PNGs; return the Markdown path.

    `stage_results` maps a step name as the driver spells it ("ingest", "round-1/train")
    to either a status string ("ran", "skipped") or a dict with a "status" key; a dict
    without one (a stage summary) counts as "ran". Steps it does not name show "done"
    when their folder holds a manifest.
    """
    run_dir = Path(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    run = Run(run_dir, out, stage_results or {})
    sections: list[Callable[[Run], list[str]]] = [
        header, stage_table, ingest_section, followups_section, rewrites_section,
        reward_model_section, rewards_section, pairs_section, train_section,
        evaluation_section]
    lines: list[str] = []
    for section in sections:
        try:
            lines += section(run)
        except Exception as error:  # noqa: BLE001 - a broken table must not fail the run
            lines += [f"_{section.__name__} could not be written: {type(error).__name__}: {error}_", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


class Run:
    """A run directory as the report sees it: its rounds, manifests, tables and plots."""

    def __init__(self, run_dir: Path, out: Path, stage_results: dict) -> None:
        self.dir, self.out, self.results = run_dir, out, stage_results
        self.rounds = planned_rounds(run_dir)

    def steps(self) -> list[tuple[str, Path]]:
        """Every step of the run as (driver step name, folder), in run order."""
        steps = [(s.name, stage_dir(self.dir, s.name)) for s in STAGES if not s.last]
        for k in self.rounds[1:]:
            steps += [(step_name(k, stage), stage_dir(self.dir, stage, k)) for stage in ROUND_STAGES]
        steps += [(s.name, stage_dir(self.dir, s.name)) for s in STAGES if s.last]
        return steps

    def manifest(self, folder: Path) -> dict[str, Any] | None:
        return read_json(folder / MANIFEST)

    def table(self, folder: Path, columns: list[str]) -> list[dict[str, Any]] | None:
        """The rows of a table folder (these columns only), or None if it is not there."""
        if not folder.is_dir() or not any(folder.glob("*.parquet")):
            return None
        return pq.read_table(folder, columns=columns).to_pylist()

    def plot(self, fig: plt.Figure, name: str, alt: str) -> str:
        """Save a figure beside report.md and return its Markdown image link."""
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=110)
        plt.close(fig)
        return f"![{alt}]({name})"


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def markdown_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    cell = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


def counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def header(run: Run) -> list[str]:
    manifests = [m for _, folder in run.steps() if (m := run.manifest(folder))]
    starts = sorted(m["started_at"] for m in manifests if m.get("started_at"))
    seeds = sorted({str(m.get("seed")) for m in manifests})
    codes = sorted({m.get("code_version", {}).get("source_sha256", "?") for m in manifests})
    return ["# Run report", "",
            f"- run directory: `{run.dir}`",
            f"- report written: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
            f"- first stage started: {starts[0] if starts else 'no stage finished'}",
            f"- seed: {', '.join(seeds) or '-'}; code version (source sha256): {', '.join(codes) or '-'}",
            ""]


# Counts shown in the stage table: the summary keys that say the most about each stage.
KEY_COUNTS = {
    "ingest": ("rows_in", "kept", "users"), "followups": ("followups", "unclassified"),
    "personas": ("users", "snapshots"), "rewrites": ("followups_in", "kept"),
    "reward_model": ("train_pairs", "eval_pairs", "steps"), "rewards": ("sampled", "kept"),
    "pairs": ("pairs",), "train": ("train_pairs", "steps", "eval_reward_accuracy"),
}


def stage_status(run: Run, step: str, manifest: dict | None) -> str:
    given = run.results.get(step)
    if isinstance(given, str):
        return given
    if isinstance(given, dict):
        return str(given.get("status", "ran"))
    return "done" if manifest else "not run"


def stage_table(run: Run) -> list[str]:
    rows, seconds = [], {}
    for step, folder in run.steps():
        manifest = run.manifest(folder)
        if manifest is None and step not in run.results:
            if "/" not in step:  # a run-level stage that did not run still gets its row
                rows.append([step, "not run", None, ""])
            continue
        counts = (manifest or {}).get("counts", {})
        keys = KEY_COUNTS.get(step.split("/")[-1], ())
        shown = ", ".join(f"{k} {counts[k]:.3f}" if isinstance(counts.get(k), float) else f"{k} {counts[k]}"
                          for k in keys if counts.get(k) is not None)
        if manifest and manifest.get("forgotten_users"):
            shown += f" (counts before {manifest['forgotten_users']} forgotten user(s))"
        # The driver's wall time of the step when it ran now (a stage's manifest times only
        # its own writer block); otherwise the manifest's.
        given = run.results.get(step)
        took = given["seconds"] if isinstance(given, dict) and given.get("status") == "ran" \
            and isinstance(given.get("seconds"), (int, float)) else manifest and manifest.get("seconds")
        rows.append([step, stage_status(run, step, manifest), took, shown])
        if took is not None:
            seconds[step] = took
    lines = ["## Stages", "", *markdown_table(["stage", "status", "seconds", "key counts"], rows)]
    if seconds:
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(seconds) + 1.5))
        bars = ax.barh(list(seconds)[::-1], list(seconds.values())[::-1], color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.set(title="Time per stage", xlabel="seconds (wall clock)", ylabel="stage")
        lines += [run.plot(fig, "stage_seconds.png", "time per stage"), ""]
    return lines


def ingest_section(run: Run) -> list[str]:
    lines = ["## Ingest", ""]
    summary = read_json(stage_dir(run.dir, "ingest") / "summary.json")
    if summary is None:
        return lines + [NOT_RUN, ""]
    filtered, rejected = summary.get("filtered", {}), summary.get("rejected", {})
    return lines + [
        f"- rows in: {summary.get('rows_in')}; conversations kept: {summary.get('kept')}; "
        f"users: {summary.get('users')}",
        f"- filtered: {sum(filtered.values())} ({counts_line(filtered)})",
        f"- rejected: {sum(rejected.values())} ({counts_line(rejected)})",
        f"- redacted: {counts_line(summary.get('redacted', {}))}", ""]


def followups_section(run: Run) -> list[str]:
    lines = ["## Follow-ups by label", ""]
    rows = run.table(table_path(run.dir, "followups", "followups"), ["label"])
    if rows is None:
        return lines + [NOT_RUN, ""]
    counts = Counter(r["label"] or "unclassified" for r in rows)
    labels = [label for label in (*FOLLOWUP_LABELS, "unclassified") if counts[label]]
    labels += sorted(set(counts) - set(labels))
    lines += markdown_table(["label", "follow-ups"], [[label, counts[label]] for label in labels])
    if labels:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        bars = ax.bar(labels, [counts[label] for label in labels], color="tab:green")
        ax.bar_label(bars, padding=2)
        ax.set(title="Follow-ups by label", xlabel="label", ylabel="follow-ups")
        ax.tick_params(axis="x", labelrotation=30)
        lines += [run.plot(fig, "followups_by_label.png", "follow-ups by label"), ""]
    return lines


def status_by_reason(run: Run, stage: str, table: str, title: str) -> list[str]:
    """Kept and filtered rows of a per-round table, filtered ones by reason."""
    lines, rows_out = [f"## {title}", ""], []
    for k in run.rounds:
        rows = run.table(table_path(run.dir, stage, table, k), ["status", "reason"])
        if rows is None:
            continue
        counts = Counter("kept" if r["status"] == "kept" else f"filtered: {r['reason']}" for r in rows)
        rows_out += [[k, what, n] for what, n in sorted(counts.items())]
    if not rows_out:
        return lines + [NOT_RUN, ""]
    return lines + markdown_table(["round", "status", "rows"], rows_out)


def rewrites_section(run: Run) -> list[str]:
    return status_by_reason(run, "rewrites", "rewrites", "Rewrites kept and filtered")


def rewards_section(run: Run) -> list[str]:
    return status_by_reason(run, "rewards", "samples", "Reward samples kept and filtered")


def reward_model_section(run: Run) -> list[str]:
    lines = ["## Reward model", ""]
    summary = read_json(stage_dir(run.dir, "reward_model") / "summary.json")
    if summary is None:
        return lines + [NOT_RUN, ""]
    before, after = summary.get("accuracy_before", {}), summary.get("accuracy_after", {})
    return lines + [f"{summary.get('train_pairs')} train pairs, {summary.get('eval_pairs')} held-out pairs, "
                    f"{summary.get('steps')} steps, encoder `{summary.get('encoder')}`.", "",
                    *markdown_table(["pairwise accuracy", "before", "after"],
                                    [[split, before.get(split), after.get(split)] for split in ("train", "eval")])]


def pairs_section(run: Run) -> list[str]:
    lines = ["## Preference pairs", ""]
    label_of = {}   # every round's follow-ups: a served_logs round labels its own
    for k in run.rounds:
        followups = run.table(table_path(run.dir, "followups", "followups", k), ["followup_id", "label"]) or []
        label_of.update({r["followup_id"]: r["label"] for r in followups})
    by_split, by_label = Counter(), Counter()
    for k in run.rounds:
        rows = run.table(table_path(run.dir, "pairs", "pairs", k), ["source", "split", "followup_id"])
        for r in rows or []:
            by_split[(k, r["source"], r["split"])] += 1
            kind = f"rewrite: {label_of.get(r['followup_id']) or 'unknown'}" if r["source"] == "rewrite" else r["source"]
            by_label[(kind, r["split"])] += 1
    if not by_split:
        return lines + [NOT_RUN, ""]
    rounds = sorted({k for k, _, _ in by_split})
    sources = sorted({s for _, s, _ in by_split})
    lines += ["By source and split:", "",
              *markdown_table(["round", "source", "train", "eval"],
                              [[k, s, by_split[(k, s, "train")], by_split[(k, s, "eval")]]
                               for k in rounds for s in sources])]
    kinds = sorted({kind for kind, _ in by_label})
    lines += ["By source, and rewrite pairs by their follow-up's label (all rounds):", "",
              *markdown_table(["source: label", "train", "eval"],
                              [[kind, by_label[(kind, "train")], by_label[(kind, "eval")]] for kind in kinds])]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = range(len(kinds))
    for offset, split, color in ((-0.2, "train", "tab:blue"), (0.2, "eval", "tab:orange")):
        bars = ax.bar([i + offset for i in x], [by_label[(kind, split)] for kind in kinds], width=0.4,
                      label=split, color=color)
        ax.bar_label(bars, padding=2)
    ax.set_xticks(list(x), kinds, rotation=30, ha="right")
    ax.set(title="Preference pairs by source and follow-up label (all rounds)",
           xlabel="source: follow-up label", ylabel="pairs")
    ax.legend(title="split")
    return lines + [run.plot(fig, "pairs_by_source_label.png", "pairs by source and label"), ""]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_section(run: Run) -> list[str]:
    lines, rows, curves, evals, tracked, skipped = ["## DPO training", ""], [], {}, {}, [], []
    for k in run.rounds:
        summary = read_json(stage_dir(run.dir, "train", k) / "summary.json")
        if summary is None:
            continue
        if summary.get("skipped"):
            skipped.append(f"- round {k} did not train: {summary['skipped']}")
        if summary.get("mlflow"):
            tracked.append(f"- round {k}: MLflow run `{summary['mlflow']['run_id']}` "
                           f"(experiment `{summary['mlflow']['experiment']}`): {summary['mlflow']['link']}")
        history = read_metrics(stage_dir(run.dir, "train", k) / "metrics.jsonl")
        curves[k] = [r for r in history if "loss" in r and "step" in r]
        if curves[k] and summary.get("eval_reward_accuracy") is not None:
            evals[k] = (curves[k][-1]["step"], summary["eval_reward_accuracy"])
        rows.append([k, summary.get("train_pairs"), summary.get("steps"), summary.get("final_loss"),
                     summary.get("last_step_reward_accuracy", summary.get("train_reward_accuracy")), summary.get("eval_reward_accuracy"),
                     summary.get("eval_loss")])
    if not rows:
        return lines + [NOT_RUN, ""]
    lines += markdown_table(["round", "train pairs", "steps", "final loss", "reward accuracy, last logged step",
                             "eval reward accuracy", "eval loss"], rows)
    if skipped:
        lines += ["", *skipped]
    if tracked:
        lines += ["", "Experiment tracking:", *tracked]
    if any(curves.values()):
        fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
        for k, points in curves.items():
            steps = [p["step"] for p in points]
            loss_ax.plot(steps, [p["loss"] for p in points], marker=".", label=f"round {k}")
            line, = acc_ax.plot(steps, [p.get("rewards/accuracies") for p in points], marker=".",
                                label=f"round {k}")
            if k in evals:  # the held-out accuracy after training, at the last step
                acc_ax.scatter(*evals[k], marker="*", s=120, color=line.get_color(), zorder=3,
                               label=f"round {k} eval (final)")
        loss_ax.set(title="DPO loss per step", xlabel="optimizer step", ylabel="loss")
        acc_ax.set(title="Reward accuracy per step", xlabel="optimizer step",
                   ylabel="rewards/accuracies (train batch)", ylim=(-0.05, 1.05))
        for ax in (loss_ax, acc_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize="small")
        lines += [run.plot(fig, "dpo_training.png", "DPO loss and reward accuracy per step"), ""]
    return lines


def evaluation_section(run: Run) -> list[str]:
    lines = ["## Evaluation", ""]
    summary = read_json(stage_dir(run.dir, "evaluate") / "summary.json")
    if summary is None:
        return lines + ["_not run: add `evaluate` to the config's stages, or run `rlhi eval`._", ""]
    arms = summary.get("arms") or {}
    if not arms:
        return lines + ["`evaluate/summary.json` has no `arms`.", ""]
    extra = sorted({key for arm in arms.values() for key, v in arm.items()
                    if key not in ("mean", "ci_low", "ci_high") and isinstance(v, (int, float))})
    rows = [[name, arm.get("mean"), arm.get("ci_low"), arm.get("ci_high"), *(arm.get(key) for key in extra)]
            for name, arm in arms.items()]
    return lines + markdown_table(["arm", "win rate", "ci low", "ci high", *extra], rows)
