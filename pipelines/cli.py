"""The `rlhi` command line.

    rlhi ingest --input PATH [PATH ...] --out RUN_DIR [--config FILE] [--format F] [--user-key K] [--skip-bad-files] [--json]
    rlhi run --config FILE [--out RUN_DIR] [--from STEP | --only STEP] [--dry-run] [--json]
    rlhi eval --config FILE [--run-dir RUN_DIR] [--json]
    rlhi report --run-dir RUN_DIR [--json]
    rlhi forget --run-dir RUN_DIR --user ID [--chat-log DIR] [--json]
    rlhi eval-followups --input CONVERSATIONS --labels FILE --backend NAME [--split NAME] [--config FILE] [--json]
    rlhi eval-preferences --input CONVERSATIONS --labels FILE [--split NAME] [--json]
    rlhi train-followups [--out DIR] [--json]
    rlhi serve --config FILE [--port N] [--json]
    rlhi redeploy --config FILE [--policy DIR] [--json]
    rlhi sim generate --users N --out DIR [--seed S] [--model ID] [--family eval|dev] [--json]
    rlhi sim run [--quick] [--users N] [--seed S] [--family eval|dev] [--decompose] [--out DIR] [--json]
    rlhi sim loop [--rounds R] [--quick] [--users N] [--seed S] [--out DIR] [--json]
    rlhi sim diagnose [--model DIR] [--n N] [--seed S] [--family dev|eval] [--rewrite-prompt quoted|chat] [--json]
    rlhi sim sweep --from DIR [--lr L,..] [--beta B,..] [--steps N,..] [--pairs oracle,rlhi] [--json]

Every command prints a human summary; with --json its last stdout line is one JSON object.
Errors in the configuration or the inputs exit with status 2 and one message naming the
file, key or row and what to do.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pipelines.config import InputFormat, RunConfig, UserKey, load_config, parse_config
from pipelines.driver import add_run_arguments


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.driver import run_stages

    return run_stages(ingest_config(args))["ingest"]


def ingest_config(args: argparse.Namespace) -> RunConfig:
    """`rlhi ingest`'s configuration: the ingest stage alone (no online rounds), its inputs
    and options from the command line over `--config`'s."""
    base = load_config(args.config) if args.config else RunConfig()
    ingest = base.ingest.model_dump()
    ingest["inputs"] = args.input
    for key in ("format", "user_key"):
        if getattr(args, key):
            ingest[key] = getattr(args, key)
    if args.skip_bad_files:
        ingest["skip_bad_files"] = True
    data = base.model_dump() | {"ingest": ingest, "run_dir": args.out, "stages": ["ingest"],
                                "online": base.online.model_dump() | {"rounds": 0}}
    return parse_config(data, "command line")


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.driver import run_command

    return run_command(args)


def followup_classify_batch(backend: str, config: RunConfig):
    """[(previous_user, answer, message[, context])] -> [(label, confidence)] for a backend;
    a model backend reads the context (the turns before the answer), as in the stage."""
    if backend == "rules":
        from actors.followup_rules import RulesClassifier

        return RulesClassifier().classify
    from actors.followup_classifier import FollowupClassifier

    classifier = FollowupClassifier(backend=backend, model=config.models.classifier,
                                    cascade_model=config.followups.cascade_model,
                                    learned_model=config.followups.learned_model)

    def classify(items: list[tuple]) -> list[tuple]:   # (previous_user, answer, message, context)
        results = classifier.classify_batch([item[3] for item in items], [item[1] for item in items],
                                            [item[2] for item in items])
        return [(r.label, r.confidence) for r in results]

    return classify


def existing_run(location: str):
    """(local folder, RemoteRun or None) of a finished run: a URI's run is pulled into its
    working copy first; a missing local folder is an error naming it."""
    from pipelines import storage

    location = storage.check_location(location, "run directory")
    if storage.is_remote(location):
        remote = storage.RemoteRun(location)
        if not remote.pull() and not any(remote.work_dir.iterdir()):
            raise ValueError(f"{location}: no finished stage in the store")
        return remote.work_dir, remote
    if not Path(location).is_dir():
        raise ValueError(f"{location}: no such run directory")
    return Path(location), None


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tools.report import write_report

    run_dir, remote = existing_run(args.run_dir)
    path = write_report(run_dir)
    if remote is not None:
        remote.publish_run_files()
    print(f"report: {path}")
    return {"report": str(path.resolve())}


def cmd_forget(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tools.forget import forget_user

    run_dir, remote = existing_run(args.run_dir)
    summary = forget_user(run_dir, args.user, Path(args.chat_log) if args.chat_log else None)
    if remote is not None:   # republish the stages that lost rows (with their companions)
        for folder in summary["stages_changed"]:
            remote.publish(run_dir / folder)
        remote.publish_run_files()
    print(f"forget {summary['user_id']}: {summary['total_rows_removed']} rows removed")
    for table, count in summary["rows_removed"].items():
        print(f"  {table}: {count}")
    if args.chat_log:
        print(f"  chat log {args.chat_log}: {summary['chat_log_rows_removed']} conversations")
    for entry in summary["checkpoints_trained_on_user"] + summary.get("derived_checkpoints", []):
        for path in entry["paths"]:
            print(f"  trained on this user's data: {path}")
    print(summary["note"])
    print(f"Run `rlhi report --run-dir {args.run_dir}` to refresh the report.")
    return summary


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.console import evaluate_lines
    from pipelines.stages.evaluate.stage import run_evaluate
    from pipelines.runtime import start_ray

    from pipelines.driver import working_copy

    config, remote = working_copy(load_config(args.config, {"run_dir": args.run_dir} if args.run_dir else {}))
    start_ray(config.resources)
    summary = run_evaluate(config)
    if remote is not None:
        summary["output"] = remote.publish(Path(summary["output"]))
    print("\n".join(evaluate_lines(summary)))
    return summary


def cmd_eval_followups(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tools.followup_eval import evaluate_backend, format_report

    config = load_config(args.config) if args.config else RunConfig()
    result = evaluate_backend(args.input, args.labels, followup_classify_batch(args.backend, config),
                              seed=config.seed, split=args.split, with_context=args.backend != "rules")
    result["backend"] = args.backend
    print(format_report(result))
    return result


def cmd_eval_preferences(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tools.preference_eval import evaluate_extractor, format_report

    result = evaluate_extractor(args.input, args.labels, split=args.split)
    print(format_report(result))
    return result


def cmd_train_followups(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.tools.train_followups import ARTIFACT, train

    meta = train(Path(args.out) if args.out else ARTIFACT)
    print(f"train-followups: {meta['training_examples']} development follow-ups, C {meta['C']}, "
          f"feedback threshold {meta['feedback_threshold']}\n"
          f"  cross-validated feedback F1 {meta['cross_validated_feedback_f1']:.3f} "
          f"(rules on the same follow-ups {meta['rules_feedback_f1_same_examples']:.3f})\n"
          f"  wrote {meta['output']}")
    return meta


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from serve.run import serve_forever

    return serve_forever(load_config(args.config), port=args.port)


def cmd_redeploy(args: argparse.Namespace) -> dict[str, Any]:
    from serve.run import redeploy_command

    return redeploy_command(load_config(args.config), policy=args.policy)


def cmd_sim_generate(args: argparse.Namespace) -> dict[str, Any]:
    from sim.generate import generate_logs

    summary = generate_logs(args.users, args.out, seed=args.seed, model=args.model, family=args.family)
    print(f"sim generate: {summary['users']} users, {summary['conversations']} conversations, "
          f"{summary['messages']} messages in {summary['seconds']}s\n"
          f"  follow-ups: " + ", ".join(f"{n} {k}" for k, n in summary["followups"].items()) +
          f"\n  mean first-answer score: {summary['mean_first_answer_score']}\n"
          f"  output: {summary['output']}")
    return summary


def add_labelled_input(parser: argparse.ArgumentParser, labels_help: str) -> None:
    """--input, --labels, --split and --json: the options of the commands that score
    against gold labels."""
    parser.add_argument("--input", required=True, metavar="CONVERSATIONS",
                        help="WildChat Parquet, or a run's ingest/conversations folder")
    parser.add_argument("--labels", required=True, metavar="FILE", help=labels_help)
    parser.add_argument("--split", metavar="NAME",
                        help="score only the labels whose `split` field is NAME (e.g. dev or test)")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON on the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhi", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    ingest = commands.add_parser("ingest", help="read WildChat Parquet or chat JSONL into a run's conversations table")
    ingest.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, folders or globs (WildChat Parquet in the Hub's schema, or chat JSONL)")
    ingest.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory; writes RUN_DIR/ingest/")
    ingest.add_argument("--config", metavar="FILE", help="take filters and settings from this run configuration")
    ingest.add_argument("--format", choices=get_args(InputFormat), help="input format (default: by extension)")
    ingest.add_argument("--user-key", choices=get_args(UserKey), help="what makes a user (default: hashed_ip)")
    ingest.add_argument("--skip-bad-files", action="store_true", help="list unreadable files instead of failing")
    ingest.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    ingest.set_defaults(handler=cmd_ingest)

    run = commands.add_parser("run", help="run the stages of a run configuration")
    add_run_arguments(run)
    run.set_defaults(handler=cmd_run)

    report = commands.add_parser("report", help="write RUN_DIR/report/report.md and its plots from a run's tables")
    report.add_argument("--run-dir", required=True, metavar="RUN_DIR")
    report.add_argument("--json", action="store_true", help="print the report path as JSON on the last line")
    report.set_defaults(handler=cmd_report)

    forget = commands.add_parser("forget", help="remove a user from every table of a run; list checkpoints trained on them")
    forget.add_argument("--run-dir", required=True, metavar="RUN_DIR")
    forget.add_argument("--user", required=True, metavar="ID", help="the user_id as in the run's tables")
    forget.add_argument("--chat-log", metavar="DIR",
                        help="also remove the user from this chat log folder (serve.chat.log.folder)")
    forget.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    forget.set_defaults(handler=cmd_forget)

    evaluate = commands.add_parser("eval", help="evaluate a run's trained policy against the base (UserEval, reasoning, Arena-Hard)")
    evaluate.add_argument("--config", required=True, metavar="FILE", help="run configuration (its evaluate and models sections)")
    evaluate.add_argument("--run-dir", metavar="RUN_DIR", help="run directory (overrides run_dir in the config)")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    evaluate.set_defaults(handler=cmd_eval)

    evalf = commands.add_parser("eval-followups", help="score a follow-up classifier backend against gold labels")
    add_labelled_input(evalf, "gold labels JSONL: conversation_hash, message_index, label")
    evalf.add_argument("--backend", required=True, choices=["rules", "llm", "learned", "cascade"])
    evalf.add_argument("--config", metavar="FILE", help="take models.classifier and the seed from this configuration")
    evalf.set_defaults(handler=cmd_eval_followups)

    evalp = commands.add_parser("eval-preferences",
                                help="score the persona extractor on gold stated preferences of feedback messages")
    add_labelled_input(evalp, "follow-up labels JSONL whose feedback rows carry `preferences`")
    evalp.set_defaults(handler=cmd_eval_preferences)

    trainf = commands.add_parser("train-followups",
                                 help="train the `learned` follow-up backend on the development labels only")
    trainf.add_argument("--out", metavar="DIR", help="artifact folder (default data/models/followup-learned)")
    trainf.add_argument("--json", action="store_true", help="print the artifact's metadata as JSON on the last line")
    trainf.set_defaults(handler=cmd_train_followups)

    serve = commands.add_parser("serve", help="serve the reward, rewrite and chat endpoints until Ctrl-C or SIGTERM")
    serve.add_argument("--config", required=True, metavar="FILE", help="run configuration YAML (its serve and models sections)")
    serve.add_argument("--port", type=int, metavar="N", help="HTTP port (overrides serve.port)")
    serve.add_argument("--json", action="store_true", help="print what was served as JSON on the last line")
    serve.set_defaults(handler=cmd_serve)

    redeploy = commands.add_parser(
        "redeploy", help="put a trained policy live in the running `rlhi serve` application, without downtime")
    redeploy.add_argument("--config", required=True, metavar="FILE",
                          help="the configuration `rlhi serve` runs (its run_dir names the trained policies)")
    redeploy.add_argument("--policy", metavar="DIR",
                          help="exported model folder (default: the newest policy the run trained)")
    redeploy.add_argument("--json", action="store_true", help="print the served policy as JSON on the last line")
    redeploy.set_defaults(handler=cmd_redeploy)

    sim = commands.add_parser("sim", help="simulated users with hidden, checkable preferences")
    sim_commands = sim.add_subparsers(dest="sim_command", required=True)
    simgen = sim_commands.add_parser("generate", help="write simulated users' conversations as WildChat logs")
    simgen.add_argument("--users", type=int, required=True, metavar="N", help="how many users to simulate")
    simgen.add_argument("--out", required=True, metavar="DIR",
                        help="writes DIR/logs/ (WildChat Parquet), DIR/profiles.jsonl, DIR/followup_labels.jsonl")
    simgen.add_argument("--seed", type=int, default=0, help="same seed, same users and reactions (default 0)")
    simgen.add_argument("--model", metavar="ID",
                        help="policy: Hub id, folder or smollm2-135m-instruct (default: the warm-start policy)")
    simgen.add_argument("--family", choices=["eval", "dev"], default="eval",
                        help="phrasing family the users speak in (data/sim/PHRASINGS.md; default eval)")
    simgen.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    simgen.set_defaults(handler=cmd_sim_generate)
    sim_commands.add_parser(   # dispatched in main() to sim/experiment.py
        "run", help="the experiment: RLHI vs base, SFT and ablations on held-out simulated users "
                    "(rlhi sim run --help)")
    sim_commands.add_parser(   # dispatched in main() to sim/loop.py
        "loop", help="the loop, measured: simulated users chat with the served policy over HTTP, R rounds of "
                     "serve -> log -> train -> redeploy (rlhi sim loop --help)")
    sim_commands.add_parser(   # dispatched in main() to sim/diagnose.py
        "diagnose", help="does the simulation's model follow what its roles are told, against chance "
                         "(rlhi sim diagnose --help)")
    sim_commands.add_parser(   # dispatched in main() to sim/sweep.py
        "sweep", help="retrain a development run's DPO arms over a grid of settings, against base_persona "
                      "(rlhi sim sweep --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["sim", "run"]:  # the experiment has its own options (sim/experiment.py)
        from sim.experiment import main as experiment_main

        return experiment_main(argv[2:])
    if argv[:2] == ["sim", "loop"]:  # the loop through a served endpoint (sim/loop.py)
        from sim.loop import main as loop_main

        return loop_main(argv[2:])
    if argv[:2] == ["sim", "diagnose"]:
        from sim.diagnose import main as diagnose_main

        return diagnose_main(argv[2:])
    if argv[:2] == ["sim", "sweep"]:  # DPO settings on a development run (sim/sweep.py)
        from sim.sweep import main as sweep_main

        return sweep_main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        result = args.handler(args)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, InputError, bad label files, a
        print(f"rlhi {args.command}: {exc}", file=sys.stderr)   # missing folder: the user's to fix
        return 2
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
