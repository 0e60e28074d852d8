"""The driver: run a configuration's stages in order, then its online rounds.

    python -m pipelines.driver --config FILE [--out RUN_DIR] [--from STEP | --only STEP] [--dry-run] [--json]

(the same as `rlhi run`). Round 0 runs `config.stages` (ingest, followups, personas,
rewrites, reward_model, rewards, pairs, train); online round k = 1..online.rounds reruns
`online.stages` with the policy round k-1 trained, writing under `<run_dir>/round-<k>/`;
evaluate comes last. The stages and what each depends on are declared in
pipelines/registry.py. A step whose key (its settings, the seed, its inputs, its code, the
step before it) matches its manifest is skipped. `--dry-run` starts nothing: it prints the
plan, what each step reads, and the per-GPU memory estimate of each training setting
(pipelines/stages/train/memory.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.code_hash import REPO, code_hash
from pipelines.config import RunConfig, load_config
from pipelines.console import format_dry_run, step_lines
from pipelines.registry import settings_of, stage as registered
from pipelines.schema import stage_dir, step_name
from pipelines.stages.ingest.sources import resolve_inputs
from pipelines import storage


def plan(config: RunConfig) -> list[tuple[int, str]]:
    """(round, stage) in the order they run; evaluate comes last, after the online rounds,
    so it judges the newest policy."""
    steps = [(0, name) for name in config.stages if not registered(name).last]
    for k in range(1, config.online.rounds + 1):
        steps += [(k, name) for name in config.online.stages]
    return steps + [(0, name) for name in config.stages if registered(name).last]


def step_key(config: RunConfig, round_index: int, name: str, previous: str | None,
             code_root: Path = REPO) -> str:
    """A hash of what one step's output depends on: its settings and the seed
    (pipelines/registry.py), the round, its inputs' content (ingest), the content of the
    local model folders its settings name (`model_content`), the code it runs
    (pipelines/code_hash.py, read under `code_root`) and the key of the step before it.
    Chaining the keys along the plan makes a change rerun that step and every step after it."""
    from pipelines.contract import fingerprint, model_content

    data: dict[str, Any] = {"stage": name, "round": round_index, "previous": previous,
                            "settings": settings_of(config, name),
                            "code": code_hash(registered(name).module, code_root)}
    data["models"] = {key: model_content(spec["id"], config.run_dir) for key, spec in data["settings"].items()
                      if key.startswith("models.") and isinstance(spec, dict) and spec.get("id")}
    if name == "ingest":
        data["settings"]["ingest"]["inputs"] = [input_identity(item, config.run_dir) for item in config.ingest.inputs]
        data["inputs"] = [(input_identity(f["path"], config.run_dir), f["sha256"])
                          for f in fingerprint(resolve_inputs(config.ingest.inputs))]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_plan(config: RunConfig) -> None:
    """Record this configuration's plan in RUN_DIR/plan.json (`schema.planned_rounds`): round
    folders that an earlier configuration left behind are then not this run's."""
    from pipelines.schema import PLAN_FILE

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = {"online_rounds": config.online.rounds, "steps": [step_name(k, s) for k, s in plan(config)]}
    temporary = run_dir / f".{PLAN_FILE}.tmp"
    temporary.write_text(json.dumps(recorded))
    temporary.replace(run_dir / PLAN_FILE)


def input_identity(path: str, run_dir: str) -> str:
    """An input file as the rerun key names it: one downloaded from object storage by its
    place under the working copy's `.inputs/` (`<hash of its URI>/<name>`, the same on every
    machine, so a run pulled into another working copy skips what is current), a local file
    by its path."""
    downloads = Path(run_dir).resolve() / ".inputs"
    resolved = Path(path).resolve()
    return f".inputs/{resolved.relative_to(downloads)}" if resolved.is_relative_to(downloads) else str(path)


def step_keys(config: RunConfig, code_root: Path = REPO) -> dict[str, str]:
    """Step name -> key, for every step of the plan, chained in order."""
    keys, previous = {}, None
    for k, name in plan(config):
        previous = keys[step_name(k, name)] = step_key(config, k, name, previous, code_root)
    return keys


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
    for (k, stage_name), name in zip(steps, names):
        if only is not None:
            if name == only:
                out.append((k, stage_name, "force"))
        elif start is not None:
            out.append((k, stage_name, "keep" if names.index(name) < names.index(start) else "force"))
        else:
            out.append((k, stage_name, "auto"))
    return out


def run_pipeline(config: RunConfig, *, start: str | None = None, only: str | None = None,
                 report: bool = True) -> dict[str, Any]:
    """Run the planned steps on Ray, skipping those whose output is current; returns
    {"run_dir", "report", "stages": {name: {"status", "seconds", "counts", "output"}}}."""
    from pipelines.contract import RUN_KEY, STEP_STARTED, read_manifest
    from pipelines.metrics import export_stage_metrics
    from pipelines.runtime import start_ray
    from pipelines.tools.forget import reapply_forgets

    requested_run_dir = config.run_dir
    config, remote = working_copy(config)
    if remote is not None:   # a stage that committed here but whose publication failed or was killed
        for folder in remote.unpublished():
            print(f"published {remote.publish(folder)} (its last publication had not finished)", flush=True)
    steps = select_steps(config, start, only)
    write_plan(config)
    if any(stage_name == "ingest" for _, stage_name, mode in steps if mode != "keep"):
        resolve_inputs(config.ingest.inputs)  # a missing input fails before Ray starts
    dashboard = start_ray(config.resources)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)
    results: dict[str, Any] = {}
    previous, dirty = None, False
    if only is not None:   # chain the key as a whole run would, so the next plain run finds it current
        planned = plan(config)
        position = [step_name(k, s) for k, s in planned].index(only)
        if position > 0:
            k, before = planned[position - 1]
            previous = (read_manifest(config.run_dir, before, k) or {}).get("run_key")
    for round_index, stage_name, mode in steps:
        name, entry = step_name(round_index, stage_name), registered(stage_name)
        manifest = read_manifest(config.run_dir, stage_name, round_index)
        if mode == "keep":   # before --from: reused as it is, keyed as it was recorded (its inputs may be gone)
            if manifest is None:
                raise RuntimeError(f"--from: step {name} before it has not finished; run without --from first")
            key = manifest.get("run_key")
        else:
            key = step_key(config, round_index, stage_name, previous)
        previous = key
        current = manifest is not None and manifest.get("run_key") == key
        if mode == "keep" or (mode == "auto" and current and not dirty):
            output = stage_dir(config.run_dir, stage_name, round_index)
            results[name] = {"status": "skipped", "seconds": 0.0, "counts": manifest["counts"],
                             "output": f"{remote.uri}/{remote.relative(output)}" if remote else str(output)}
            print(f"[{name}] skipped: its output matches its settings and inputs"
                  + ("" if current else " (kept by --from)"), flush=True)
            continue
        dirty = True
        print(f"[{name}] starting", flush=True)
        started = time.time()
        token, clock, run = RUN_KEY.set(key), STEP_STARTED.set(started), storage.REMOTE_RUN.set(remote)
        try:
            runner = entry.runner()
            summary = runner(config, round_index) if entry.per_round else runner(config)
        finally:
            RUN_KEY.reset(token)
            STEP_STARTED.reset(clock)
            storage.REMOTE_RUN.reset(run)
        output = summary.pop("output", None)
        if output and (removed := reapply_forgets(Path(config.run_dir), Path(output))):
            print(f"[{name}] removed {removed} rows of users forgotten earlier (forget.jsonl)", flush=True)
        if output and remote is not None:
            output = remote.publish(Path(output))
            remote.publish_run_files()
            print(f"[{name}] published {output}", flush=True)
        seconds = round(time.time() - started, 1)
        results[name] = {"status": "ran", "seconds": seconds, "counts": summary, "output": output}
        export_stage_metrics(stage_name, round_index, summary)
        lines = step_lines(stage_name, name, {**summary, "output": output})
        print("\n".join(lines) + f"\n[{name}] done in {seconds:.1f} s", flush=True)
    out: dict[str, Any] = {"run_dir": str(Path(config.run_dir).resolve()), "report": None, "stages": results}
    if report:
        from pipelines.tools.report import write_report

        out["report"] = str(write_report(Path(config.run_dir), results).resolve())
        print(f"report: {out['report']}", flush=True)
    if remote is not None:
        remote.publish_run_files()
        out.update(run_dir=requested_run_dir, work_dir=str(remote.work_dir))
    return out


def working_copy(config: RunConfig) -> tuple[RunConfig, storage.RemoteRun | None]:
    """The config the stages run with: a `run_dir` in object storage becomes its local working
    copy (finished stages pulled from the store), and input URIs become downloaded files."""
    remote = None
    if storage.is_remote(config.run_dir):
        remote = storage.RemoteRun(config.run_dir, config.work_dir)
        if pulled := remote.pull():
            print(f"pulled {len(pulled)} finished stage(s) from {config.run_dir} into {remote.work_dir}", flush=True)
        config = config.model_copy(update={"run_dir": str(remote.work_dir)})
    if "ingest" in config.stages and any(storage.is_remote(item) for item in config.ingest.inputs):
        inputs = storage.download_inputs(list(config.ingest.inputs), Path(config.run_dir))
        config = config.model_copy(update={"ingest": config.ingest.model_copy(update={"inputs": inputs})})
    return config, remote


def dry_run(config: RunConfig) -> dict[str, Any]:
    """The plan and the training memory estimates; starts nothing."""
    from pipelines.stages.train.memory import memory_report

    run_dir = config.run_dir if storage.is_remote(config.run_dir) else str(Path(config.run_dir).resolve())
    out: dict[str, Any] = {"run_dir": run_dir,
                           "plan": [step_name(k, s) for k, s in plan(config)],
                           "reads": {step_name(k, s): list(registered(s).reads) for k, s in plan(config)}}
    if "train" in config.stages or (config.online.rounds and "train" in config.online.stages):
        settings = config.train
        bf16 = settings.bf16 if settings.bf16 is not None else settings.gpus_per_worker > 0
        out["train_memory"] = memory_report(settings, config.models.policy.id,
                                            settings.gpu_memory_gib, bf16=bf16)
    return out


def run_stages(config: RunConfig, **options: Any) -> dict[str, Any]:
    """Run the plan without the report (library use: tests, the simulation). Returns each
    step's summary by name (a skipped step: its manifest's counts) with its `output`."""
    result = run_pipeline(config, report=False, **options)
    return {name: {**step["counts"], "output": step["output"]} for name, step in result["stages"].items()}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `rlhi run` / `python -m pipelines.driver`."""
    parser.add_argument("--config", required=True, metavar="FILE", help="run configuration YAML (e.g. configs/default.yaml)")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (overrides run_dir in the config)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STEP",
                       help="rerun STEP and every step after it (e.g. rewards, round-1/train); earlier ones are kept")
    which.add_argument("--only", metavar="STEP", help="run only STEP (its inputs must exist)")
    parser.add_argument("--dry-run", action="store_true",
                        help="start nothing: print the plan and the per-GPU memory estimate of each training setting")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """`rlhi run`: the dry run, or the whole plan with its report."""
    overrides = {"run_dir": args.out} if args.out else {}
    config = load_config(args.config, overrides)
    if args.dry_run:
        report = dry_run(config)
        print(format_dry_run(report))
        return report
    return run_pipeline(config, start=args.start, only=args.only)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.driver` (what `ray job submit` runs): the same as `rlhi run`."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.driver", description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run_command(args)
    except ValueError as exc:  # ConfigError, InputError: the user's to fix
        print(f"rlhi run: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
