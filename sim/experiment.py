"""The simulated-user experiment: does RLHI make a policy satisfy users it has only read about?

    python -m sim.experiment --quick [--users N] [--seed S] [--out DIR] [--json]

Top to bottom (Jin et al. 2025, sec. 4 in miniature, with a checkable ground truth):
1. Simulated users with hidden profiles talk to the warm-start policy (`generate_logs`).
2. The RLHI pipeline reads only those logs: ingest, follow-ups, personas, rewrites from
   feedback, user-based rewards, pairs, persona-DPO. Two ablations rerun the stages they
   change on a copy of the run (the driver skips the unchanged ones): `user_agnostic` and
   `rewrites_from_scratch`.
3. An SFT arm fine-tunes the warm-start policy on the same kept rewrites (the paper's
   "RL beats SFT" comparison), with TRL's SFTTrainer.
4. Held-out users (the pipeline's eval split: no pair of theirs is trained on) ask new
   requests; every arm answers, the checker scores each answer against the hidden profile.
5. A table with bootstrap intervals over users, a PNG plot and `results.json` in `--out`,
   with `rlhi sim diagnose`'s figures for the warm-start (does each role act on what it is
   told, against chance): where the rewriter's ratio is near 1, the rewrites carry no signal.

Only step 4's checker reads `profiles.jsonl`; every arm sees what the pipeline built from logs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from pipelines.persona_join import user_splits
from pipelines.schema import model_path, table_path
from pipelines.bootstrap import mean_interval, paired_difference
from sim.arms import Arm, EvalUser, evaluate_arm, sft_rows, train_sft
from sim.diagnose import CHECKS, diagnose_model
from sim.profiles import Profile, check_answer
from sim.warmstart import REWRITE_PROMPT

ARMS = ("base", "base_persona", "sft", "rlhi", "user_agnostic", "from_scratch")
ABLATIONS = {"rlhi": {}, "user_agnostic": {"user_agnostic": True},
             "from_scratch": {"rewrites_from_scratch": True}}
# Result key -> the arm RLHI is compared with, paired over held-out users.
DIFFERENCES = {"rlhi_minus_base": "base", "persona_minus_agnostic": "user_agnostic",
               "rlhi_minus_base_persona": "base_persona"}


@dataclass(frozen=True)
class Sizes:
    """Every size knob of one experiment, named once. The defaults are the full run (about
    130 held-out users); `QUICK` is the CI-sized one."""

    users: int = 400
    eval_fraction: float = 0.35       # share of users held out (their pairs are never trained on)
    max_new_tokens: int = 160         # long answers need ~130 words; the warm-start stops itself
    max_followups: int = 400          # feedback follow-ups rewritten
    reward_prompts: int = 64          # prompts sampled and scored for user-based rewards
    reward_n: int = 4
    dpo_steps: int = 150              # ~2.5 epochs, as the quick run's 60 steps over ~90 pairs
    dpo_batch: int = 4
    dpo_learning_rate: float = 1e-4
    dpo_beta: float = 0.1
    sft_learning_rate: float = 5e-4
    requests_per_user: int = 24       # held-out requests per held-out user
    samples_per_request: int = 1
    train_sources: tuple[str, ...] = ("rewrite",)


# The CI-sized run; README ("The simulated-user experiment") says why each size is what it is.
QUICK = replace(Sizes(), users=200, max_followups=120, reward_prompts=32, dpo_steps=60)


def pipeline_config(run_dir: Path, logs: Path, model: str, sizes: Sizes, seed: int,
                    ablation: dict[str, bool]) -> dict[str, Any]:
    """The RunConfig (as a dict) of one pipeline variant: it reads `logs` and nothing else."""
    spec = {"id": model, "engine": "transformers", "max_new_tokens": sizes.max_new_tokens,
            "batch_size": 32, "seed": seed}
    return {
        "run_dir": str(run_dir), "seed": seed, "ingest": {"inputs": [str(logs)]},
        "resources": {"progress_bars": False},
        # The rewriter samples (T=0.7): greedy, a tiny model rewrites one request alike
        # whatever the feedback said; in the chat layout the warm-start is trained on.
        # `rlhi sim diagnose` measures whether it acts on the feedback.
        "models": {"policy": spec, "judge": spec, "reward": spec, "persona": spec,
                   "rewriter": spec | {"temperature": 0.7, "rewrite_prompt": REWRITE_PROMPT}},
        "personas": {"eval_fraction": sizes.eval_fraction, "min_eval_users_with_history": 4},
        # The logged answer the user complained about is the rejected one: it is known to miss.
        "rewrites": {"rejected": "original", "max_followups": sizes.max_followups, "batch_size": 16,
                     # A fix from "short" (<= 40 words) to "long" (> 100) is a real rewrite here.
                     "filter": {"judge": False, "margin": 0.0, "max_length_ratio": 8.0}},
        "rewards": {"n": sizes.reward_n, "max_prompts": sizes.reward_prompts, "batch_size": 16,
                    "min_z": 0.5},
        "train": {"sources": list(sizes.train_sources), "workers": 1,
                  "per_device_batch_size": sizes.dpo_batch, "max_steps": sizes.dpo_steps,
                  "save_steps": sizes.dpo_steps, "learning_rate": sizes.dpo_learning_rate,
                  "beta": sizes.dpo_beta, "max_length": 1024, "resources_timeout_s": 120},
        "ablation": ablation,
        "stages": [s for s in ("ingest", "followups", "personas", "rewrites", "rewards", "pairs", "train")
                   if s != "rewards" or "reward" in sizes.train_sources],
    }


def run_variants(out: Path, logs: Path, model: str, sizes: Sizes, seed: int,
                 log: Callable[[str], None]) -> dict[str, Path]:
    """The RLHI run and its two ablations; each ablation starts from a copy of the RLHI run,
    so ingest, follow-ups and personas run once."""
    from pipelines.driver import run_stages
    from pipelines.config import parse_config
    from pipelines.runtime import start_ray

    runs = {}
    for name, ablation in ABLATIONS.items():
        run_dir = out / "runs" / name
        if name != "rlhi" and not run_dir.exists():
            shutil.copytree(runs["rlhi"], run_dir)
        config = parse_config(pipeline_config(run_dir, logs, model, sizes, seed, ablation))
        start_ray(config.resources)
        t0 = time.perf_counter()
        run_stages(config)
        log(f"pipeline {name}: {time.perf_counter() - t0:.0f}s")
        runs[name] = run_dir
    return runs


def eval_users(run_dir: Path, profiles_file: Path) -> list[EvalUser]:
    """The pipeline's held-out users with their serving persona (built from their logs);
    their hidden profile is joined only here, for the checker."""
    held_out = {user for user, split in user_splits(run_dir).items() if split == "eval"}
    personas = pq.read_table(table_path(run_dir, "personas", "personas")).to_pylist()
    serving = {p["user_id"]: p["persona"] for p in personas if p["serving"]}
    profiles = read_profiles(profiles_file)
    return [EvalUser(u, serving.get(u, ""), profiles[u]) for u in sorted(held_out)]


def read_profiles(profiles_file: Path) -> dict[str, Profile]:
    """user id (the simulated hashed IP) -> hidden profile."""
    profiles = {}
    for line in profiles_file.read_text().splitlines():
        raw = json.loads(line)
        profiles[raw["hashed_ip"]] = Profile(**raw)
    return profiles


def pair_quality(run_dir: Path, profiles_file: Path) -> dict[str, dict[str, float]]:
    """Per pair source, over the run's train pairs: how much better the chosen answer is than
    the rejected one by the checker (chosen - rejected, and how often it is better or worse).
    What DPO can learn from the pairs at most; near 0, no training can show an effect."""
    profiles = read_profiles(profiles_file)
    diffs: dict[str, list[float]] = {}
    for row in pq.read_table(table_path(run_dir, "pairs", "pairs")).to_pylist():
        if row["split"] == "train":
            prefs = profiles[row["user_id"]].preferences
            diffs.setdefault(row["source"], []).append(
                check_answer(prefs, row["chosen"][-1]["content"]).score
                - check_answer(prefs, row["rejected"][-1]["content"]).score)
    return {source: {"pairs": len(d), "chosen_minus_rejected": round(sum(d) / len(d), 4),
                     "better": sum(x > 0 for x in d), "worse": sum(x < 0 for x in d)}
            for source, d in sorted(diffs.items())}


def train_users(run_dir: Path) -> set[str]:
    return {user for user, split in user_splits(run_dir).items() if split == "train"}


def build_arms(out: Path, runs: dict[str, Path], base_model: str, sizes: Sizes, seed: int) -> list[Arm]:
    """The six arms; the SFT arm is trained here on the RLHI run's kept rewrites of train users."""
    rewrites = pq.read_table(table_path(runs["rlhi"], "rewrites", "rewrites"))
    sft = train_sft(base_model, sft_rows(rewrites, train_users(runs["rlhi"])), out / "sft",
                    max_steps=sizes.dpo_steps, learning_rate=sizes.sft_learning_rate,
                    batch_size=sizes.dpo_batch, seed=seed)
    trained = {name: str(model_path(run, "train")) for name, run in runs.items()}
    return [Arm("base", base_model, False), Arm("base_persona", base_model, True),
            Arm("sft", str(sft), True),
            Arm("rlhi", trained["rlhi"], True, str(runs["rlhi"])),
            Arm("user_agnostic", trained["user_agnostic"], False, str(runs["user_agnostic"])),
            Arm("from_scratch", trained["from_scratch"], True, str(runs["from_scratch"]))]


def summarize(scores: dict[str, dict[str, float]], seed: int) -> dict[str, Any]:
    """Per-arm intervals and the paired differences the experiment is about: RLHI against the
    base policy, against the user-agnostic ablation, and against the base policy answering
    with the same personas (what training adds to persona-guided inference alone)."""
    arms = {name: mean_interval([s[u] for u in sorted(s)], seed=seed).to_json() for name, s in scores.items()}
    return {"arms": arms} | {key: paired_difference(scores["rlhi"], scores[other], seed=seed).to_json()
                             for key, other in DIFFERENCES.items()}


def markdown_table(result: dict[str, Any]) -> str:
    lines = ["| arm | mean satisfaction | 95% CI |", "|---|---|---|"]
    rows = list(result["arms"].items()) + [(f"rlhi − {other} (paired)", result[key])
                                           for key, other in DIFFERENCES.items()]
    for name, iv in rows:
        lines.append(f"| {name} | {iv['mean']:.3f} | [{iv['ci_low']:.3f}, {iv['ci_high']:.3f}] |")
    return "\n".join(lines)


def roles_line(roles: dict[str, Any]) -> str:
    return "Roles of the warm-start, followed / chance (`rlhi sim diagnose`): " + ", ".join(
        f"{c} {roles[c]['followed']:.2f} / {roles[c]['chance']:.2f}" for c in CHECKS)


def pairs_line(pairs: dict[str, dict[str, float]]) -> str:
    return "Train pairs of the rlhi run, checker chosen - rejected: " + ", ".join(
        f"{source} {q['chosen_minus_rejected']:+.3f} ({q['better']} better, {q['worse']} worse of {q['pairs']})"
        for source, q in pairs.items())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["arms"])
    means = [result["arms"][n]["mean"] for n in names]
    errors = [[m - result["arms"][n]["ci_low"] for n, m in zip(names, means)],
              [result["arms"][n]["ci_high"] - m for n, m in zip(names, means)]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, means, yerr=errors, capsize=4, color=["#999"] * 2 + ["#6a9"] + ["#c53"] + ["#79c"] * 2)
    ax.set_ylabel("preference satisfaction (checker)")
    ax.set_ylim(0, 1)
    ax.set_title("Held-out simulated users, 95% bootstrap CI over users")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_experiment(*, users: int | None = None, seed: int = 0, out: str | Path = "runs/sim-experiment",
                   quick: bool = False, sizes: Sizes | None = None,
                   log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the result (arms, paired differences,
    seconds, sizes) also written to `out/results.json`, `out/results.md`, `out/results.png`."""
    from sim.generate import generate_logs
    from sim.warmstart import ensure_warmstart

    t0 = time.perf_counter()
    sizes = sizes or (QUICK if quick else Sizes())
    if users is not None:
        sizes = replace(sizes, users=users)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_model = str(ensure_warmstart(log))
    sim = out / "sim"
    made = {"users": sizes.users, "seed": seed, "model": base_model, "max_new_tokens": sizes.max_new_tokens}
    if not (sim / "made.json").exists() or json.loads((sim / "made.json").read_text()) != made:
        t1 = time.perf_counter()
        generate_logs(sizes.users, sim, seed=seed, model=base_model, max_new_tokens=sizes.max_new_tokens,
                      log=lambda s: None)
        (sim / "made.json").write_text(json.dumps(made))  # a rerun into `out` reuses the logs
        log(f"simulated {sizes.users} users: {time.perf_counter() - t1:.0f}s")
    roles = diagnose_model(base_model, n=110, seed=seed)
    log(roles_line(roles))
    runs = run_variants(out, sim / "logs", base_model, sizes, seed, log)
    pairs = pair_quality(runs["rlhi"], sim / "profiles.jsonl")
    log(pairs_line(pairs))
    arms = build_arms(out, runs, base_model, sizes, seed)
    held_out = eval_users(runs["rlhi"], sim / "profiles.jsonl")
    scores = {arm.name: evaluate_arm(arm, held_out, requests_per_user=sizes.requests_per_user,
                                     samples=sizes.samples_per_request, seed=seed,
                                     max_new_tokens=sizes.max_new_tokens, log=log) for arm in arms}
    result = summarize(scores, seed) | {
        "users": {"total": sizes.users, "held_out": len(held_out)}, "seed": seed,
        "seconds": round(time.perf_counter() - t0, 1), "sizes": asdict(sizes), "roles": roles,
        "pairs": pairs, "per_user": scores}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text("\n\n".join([markdown_table(result), roles_line(roles), pairs_line(pairs)]) + "\n")
    plot(result, out / "results.png")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhi sim run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run with fixed seeds (minutes on 2 CPUs)")
    parser.add_argument("--users", type=int, default=None, help="simulated users (default: the size's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sim-experiment")
    parser.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = parser.parse_args(argv)
    result = run_experiment(users=args.users, seed=args.seed, out=args.out, quick=args.quick)
    print(markdown_table(result))
    print(f"{result['seconds']:.0f}s; table, plot and results.json in {args.out}")
    if args.json:
        keys = ("arms", *DIFFERENCES)
        print(json.dumps({k: result[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
