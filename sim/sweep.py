"""DPO settings, chosen on a development run: retrain an experiment's DPO arms over a grid.

    rlhi sim sweep --from DIR [--lr 1e-4,1e-3] [--beta 0.1] [--steps 80] [--pairs oracle,rlhi] [--json]

`DIR` is a finished `rlhi sim run --family dev --decompose` (its pipeline runs, its oracle
pairs, its held-out users' `base_persona` scores). For every setting and pair set, the
train stage reruns on a copy of that run (`DIR/sweep/<pairs>-lr<..>-b<..>-s<..>/`) from
the same warm-start, the new policy answers the same held-out requests, and the table gives
its paired difference with `base_persona`. `oracle` trains on the checker-ranked pairs
(what DPO can learn when the pairs are right), `rlhi` on the pipeline's own pairs.

The sweep tunes, so it refuses a run on the evaluation phrasing family: the settings it
picks are then measured on seeds and phrasings it never saw (`rlhi sim run`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from pipelines.bootstrap import paired_difference

PAIR_SETS = ("oracle", "rlhi")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def read_experiment(exp: Path) -> dict[str, Any]:
    """The finished experiment's results.json; an evaluation-family run is refused."""
    results = exp / "results.json"
    if not results.exists():
        raise ValueError(f"{results} is missing: run `rlhi sim run --family dev --decompose "
                         f"--out {exp}` first")
    result = json.loads(results.read_text())
    if result.get("family") != "dev":
        raise ValueError(f"{exp} is a run on the '{result.get('family')}' phrasing family; "
                         "settings are tuned on a development run only (rlhi sim run --family dev)")
    if "base_persona" not in result["per_user"]:
        raise ValueError(f"{results} has no base_persona scores to compare with")
    return result


def train_setting(exp: Path, pair_set: str, sizes, seed: int, tag: str) -> Path:
    """Retrain DPO on a copy of the experiment's `pair_set` run with `sizes`; the policy folder."""
    from pipelines.config import parse_config
    from pipelines.runtime import start_ray
    from pipelines.schema import model_path
    from pipelines.stages.train.stage import run_train
    from sim.experiment import pipeline_config

    source = exp / "runs" / ("oracle_pairs" if pair_set == "oracle" else "rlhi")
    if not (source / "pairs").exists():
        raise ValueError(f"{source} has no pairs (was {exp} run with --decompose?)")
    run_dir = exp / "sweep" / f"{pair_set}-{tag}"
    if not run_dir.exists():
        shutil.copytree(source, run_dir)
        shutil.rmtree(run_dir / "train")  # retrained below with this setting
    model = json.loads((exp / "sim" / "made.json").read_text())["model"]
    sources = ("reward",) if pair_set == "oracle" else None
    config = parse_config(pipeline_config(run_dir, exp / "sim" / "logs", model, sizes, seed, {}, sources))
    start_ray(config.resources)
    run_train(config)
    return model_path(run_dir, "train")


def run_sweep(exp: str | Path, *, lrs: list[float], betas: list[float], steps: list[int],
              pair_sets: list[str], log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Every (pair set, lr, beta, steps): the paired difference with base_persona on the
    experiment's held-out users. Written to `DIR/sweep.json` (appended: a rerun keeps rows)."""
    from sim.arms import Arm, evaluate_arm
    from sim.experiment import Sizes, eval_users, read_profiles

    exp = Path(exp)
    result = read_experiment(exp)
    seed = int(result["seed"])
    sizes = replace(Sizes(), **{k: tuple(v) if isinstance(v, list) else v for k, v in result["sizes"].items()})
    held_out = eval_users(exp / "runs" / "rlhi", read_profiles(exp / "sim" / "profiles.jsonl"))
    base = result["per_user"]["base_persona"]
    out_file = exp / "sweep.json"
    rows = json.loads(out_file.read_text()) if out_file.exists() else []
    for pair_set, lr, beta, n_steps in itertools.product(pair_sets, lrs, betas, steps):
        tag = f"lr{lr:g}-b{beta:g}-s{n_steps}"
        t0 = time.perf_counter()
        setting = replace(sizes, dpo_learning_rate=lr, dpo_beta=beta, dpo_steps=n_steps)
        policy = train_setting(exp, pair_set, setting, seed, tag)
        scores = evaluate_arm(Arm(f"{pair_set}-{tag}", str(policy), "pipeline"), held_out,
                              requests_per_user=sizes.requests_per_user, samples=sizes.samples_per_request,
                              seed=seed, max_new_tokens=sizes.max_new_tokens)
        diff = paired_difference(scores, base, seed=seed).to_json()
        row = {"pairs": pair_set, "learning_rate": lr, "beta": beta, "steps": n_steps,
               "minus_base_persona": diff, "mean": sum(scores.values()) / len(scores),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows = [r for r in rows if (r["pairs"], r["learning_rate"], r["beta"], r["steps"])
                != (pair_set, lr, beta, n_steps)] + [row]
        out_file.write_text(json.dumps(rows, indent=2))
        log(f"{pair_set} {tag}: {diff['mean']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}] "
            f"({row['seconds']:.0f}s)")
    return {"experiment": str(exp), "seed": seed, "rows": rows}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| pairs | lr | beta | steps | − base_persona (paired) |", "|---|---|---|---|---|"]
    for r in rows:
        d = r["minus_base_persona"]
        lines.append(f"| {r['pairs']} | {r['learning_rate']:g} | {r['beta']:g} | {r['steps']} | "
                     f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhi sim sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="exp", required=True, metavar="DIR",
                        help="a finished `rlhi sim run --family dev --decompose` output folder")
    parser.add_argument("--lr", type=_floats, default=[1e-4], help="DPO learning rates, comma-separated")
    parser.add_argument("--beta", type=_floats, default=[0.1], help="DPO betas, comma-separated")
    parser.add_argument("--steps", type=_ints, default=[80], help="DPO optimizer steps, comma-separated")
    parser.add_argument("--pairs", default="oracle,rlhi",
                        help="pair sets: oracle (checker-ranked) and/or rlhi (the pipeline's)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON last")
    args = parser.parse_args(argv)
    pair_sets = [p for p in args.pairs.split(",") if p]
    unknown = sorted(set(pair_sets) - set(PAIR_SETS))
    if unknown:
        parser.error(f"--pairs: unknown {unknown}; choose from {list(PAIR_SETS)}")
    try:
        result = run_sweep(args.exp, lrs=args.lr, betas=args.beta, steps=args.steps, pair_sets=pair_sets)
    except ValueError as exc:   # not a finished development run: the user's to fix
        print(f"rlhi sim sweep: {exc}", file=sys.stderr)
        return 2
    print(table(result["rows"]))
    if args.json:
        print(json.dumps(result["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
