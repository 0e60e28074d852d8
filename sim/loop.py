"""The loop, measured: the served policy learns from the conversations it serves.

    rlhi sim loop [--rounds R] [--quick] [--users N] [--seed S] [--out DIR] [--json]

1. History: simulated users with hidden profiles talk to the warm-start offline
   (sim/generate.py), and the pipeline's round 0 reads those logs (ingest, followups,
   personas: no training), which gives each user a persona and the train/eval split. The
   held-out users are that eval split in every round: their conversations are logged and
   grow their personas, but no pair of theirs is trained on.
2. Serve: the chat app (Ray Serve on 127.0.0.1, bearer token) with the warm-start and those
   personas, logging every conversation (serve/chat_log.py).
3. Round r = 0..R: every user holds `conversations` conversations (a held-out user
   `held_out_conversations`) with the served endpoint over HTTP with the `openai` client, reacting as in the experiment (feedback on missed
   preferences, in the evaluation phrasings). The round's satisfaction of a user is the
   checker's mean score of the first answers to their new requests. Then, while r < R, an
   online round with `online.source: served_logs` ingests the log rows that arrived,
   rebuilds personas with them, makes rewrite pairs from the training users' new feedback
   and trains from the current policy; `serve.run.redeploy` puts it live.
4. `policy_gain`: the last policy and the round-0 policy both answer the held-out users' new
   requests with the last round's personas (sim/arms.py), paired over users, so it counts
   what training added apart from the personas' growth.

How the 2 CPUs are shared: the chat replica reserves 0.5 CPU, the Train worker 1 and each
Ray Data actor 0.5, so the serving app stays up while a round's stages and the DPO worker
schedule beside it (the users are idle while a round trains).

Writes `results.json` (`rounds`: R+1 entries, round 0 first; `last_minus_first`;
`policy_gain`), `results.md` and `results.png` (satisfaction by round) under `--out`.
"""
from __future__ import annotations

import argparse
import json
import random
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipelines.bootstrap import mean_interval, paired_difference
from sim.generate import Conversation, draw_topic, react
from sim.phrasings import Bank, load_bank
from sim.profiles import Profile, check_answer
from sim.requests import make_request


@dataclass(frozen=True)
class LoopSizes:
    """Every size knob of the loop, named once; `QUICK` fits 3 rounds in 30 minutes on 2 cores."""

    users: int = 200
    conversations: int = 2                 # per training user per round, over HTTP
    held_out_conversations: int = 4        # per held-out user per round: their satisfaction is the measure
    eval_fraction: float = 0.35
    max_new_tokens: int = 160
    dpo_learning_rate: float = 1e-4
    dpo_beta: float = 0.1
    dpo_batch: int = 4
    dpo_epochs: float = 2.0
    policy_gain_requests: int = 12         # new requests per held-out user for policy_gain
    client_threads: int = 16               # users talking at once (the chat replica batches them)


QUICK = replace(LoopSizes(), users=80)
LOG_BATCH_SECONDS = 5.0   # the chat log writes a batch this long after its first turn; a round waits for it


def loop_config(run_dir: Path, history: Path, log: Path, model: str, sizes: LoopSizes, seed: int,
                rounds: int, port: int) -> dict[str, Any]:
    """The RunConfig (as a dict): round 0 reads the offline history, rounds 1..`rounds` the log."""
    from sim.experiment import pipeline_config

    config = pipeline_config(run_dir, history, model, replace_for_experiment(sizes), seed, {}, ("rewrite",))
    config["stages"] = ["ingest", "followups", "personas"]
    config["personas"] = {"eval_fraction": sizes.eval_fraction, "min_eval_users_with_history": 4}
    config["rewrites"]["max_followups"] = None
    config["train"] |= {"max_steps": -1, "epochs": sizes.dpo_epochs, "cpus_per_worker": 1}
    config["online"] = {"rounds": rounds, "source": "served_logs", "logs": str(log),
                        "stages": ["ingest", "followups", "personas", "rewrites", "pairs", "train"]}
    config["serve"] = {"port": port, "max_tokens": sizes.max_new_tokens,
                       "reward": {"enabled": False}, "rewrite": {"enabled": False},
                       "chat": {"num_cpus": 0.5, "max_batch_size": sizes.client_threads,
                                "batch_wait_timeout_s": 0.05,
                                "log": {"enabled": True, "folder": str(log), "max_batch_conversations": 64,
                                        "max_batch_seconds": LOG_BATCH_SECONDS}}}
    return config


def replace_for_experiment(sizes: LoopSizes):
    """The experiment's Sizes carrying the loop's DPO and decoding settings."""
    from sim.experiment import QUICK as EXPERIMENT

    return replace(EXPERIMENT, users=sizes.users, eval_fraction=sizes.eval_fraction,
                   max_new_tokens=sizes.max_new_tokens, dpo_learning_rate=sizes.dpo_learning_rate,
                   dpo_beta=sizes.dpo_beta, dpo_batch=sizes.dpo_batch, train_sources=("rewrite",))


def converse(profiles: list[Profile], base_url: str, token: str, round_index: int, sizes: LoopSizes,
             bank: Bank, seed: int, held_out: set[str]) -> dict[str, list[float]]:
    """Every user holds `sizes.conversations` conversations (a held-out user
    `sizes.held_out_conversations`) with the served policy over HTTP; returns user id ->
    checker scores of the first answers to their requests."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=2, timeout=600)
    conversations = []
    for profile in profiles:
        count = sizes.held_out_conversations if profile.hashed_ip in held_out else sizes.conversations
        for c in range(count):
            rng = random.Random(f"{seed}/loop/{round_index}/{profile.hashed_ip}/{c}")
            conv = Conversation(profile, c, rng, datetime.now(timezone.utc))
            conv.request = make_request(draw_topic(profile, rng), rng)
            conv.user_says(conv.request)
            conversations.append(conv)
    scores: dict[str, list[float]] = {}

    def talk(conv: Conversation) -> None:
        cid = f"loop-{seed}-r{round_index}-u{conv.profile.user_index}-c{conv.index}"
        while not conv.done:
            first_answer = conv.judge_next and conv.messages[-1]["content"] == conv.request
            reply = client.chat.completions.create(
                model="rlhi", messages=[{"role": m["role"], "content": m["content"]} for m in conv.messages],
                user=conv.profile.hashed_ip, max_tokens=sizes.max_new_tokens,
                extra_body={"conversation_id": cid})
            # The answer goes back verbatim, as a client would send it: the chat log matches
            # it to the logged turn (and the policy version that wrote it).
            text = reply.choices[0].message.content or ""
            answer = text.strip() or "(no answer)"
            if first_answer:
                scores.setdefault(conv.profile.hashed_ip, []).append(
                    check_answer(conv.profile.preferences, answer).score)
            conv.messages.append({"role": "assistant", "content": text or answer})
            react(conv, answer, bank)

    with ThreadPoolExecutor(sizes.client_threads) as pool:
        list(pool.map(talk, conversations))
    return scores


def round_figures(scores: dict[str, list[float]], held_out: set[str], train: set[str], seed: int) -> dict[str, Any]:
    """One round's satisfaction (held-out users with an interval over users; training users)."""
    per_user = {u: sum(s) / len(s) for u, s in scores.items() if s}
    out = {}
    for name, users in (("held_out", held_out), ("train", train)):
        values = [per_user[u] for u in sorted(users & per_user.keys())]
        out[name] = mean_interval(values, seed=seed).to_json() | {"users": len(values)}
    return out | {"per_user": per_user}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_loop(*, rounds: int, users: int | None = None, seed: int = 0, out: str | Path = "runs/sim-loop",
             quick: bool = False, log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run R rounds of serve -> log -> train -> redeploy into `out`; returns the result (also
    `out/results.json`, `results.md`, `results.png`)."""
    from ray import serve

    from pipelines.config import parse_config
    from pipelines.driver import run_stages
    from pipelines.persona_join import user_splits
    from pipelines.runtime import start_ray
    from pipelines.rounds import policy_spec
    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient
    from serve.guard import token_digest
    from serve.replicas import load_serving_personas, policy_version
    from serve.run import close_chat_log, redeploy
    from sim.arms import Arm, EvalUser, evaluate_arm
    from sim.experiment import read_profiles
    from sim.generate import generate_logs
    from sim.warmstart import ensure_warmstart

    t0 = time.perf_counter()
    sizes = QUICK if quick else LoopSizes()
    sizes = replace(sizes, users=users) if users is not None else sizes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_model = str(ensure_warmstart(log))
    history, chat_log, run_dir = out / "history", out / "chat-log", out / "run"
    if not (history / "profiles.jsonl").is_file():
        generate_logs(sizes.users, history, seed=seed, model=base_model, max_new_tokens=sizes.max_new_tokens,
                      family="eval", log=lambda s: None)
    profiles = read_profiles(history / "profiles.jsonl")
    port, token = free_port(), secrets.token_urlsafe(24)
    config = parse_config(loop_config(run_dir, history / "logs", chat_log, base_model, sizes, seed, 0, port))
    start_ray(config.resources)
    serve.start(http_options={"host": "127.0.0.1", "port": port})   # its proxy first, while Ray is idle
    run_stages(config)
    splits = user_splits(run_dir)
    held_out = {u for u, s in splits.items() if s == "eval"}
    train = {u for u, s in splits.items() if s == "train"}
    log(f"history: {len(profiles)} users ({len(held_out)} held out), round 0 personas built "
        f"({time.perf_counter() - t0:.0f}s)")
    bank = load_bank("eval")
    serve.run(build_app(config, token_digest(token)), name=APP_NAME, route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    figures: list[dict[str, Any]] = []
    try:
        RLHIClient(base_url, token).wait_healthy(timeout_s=300)
        served = config
        for r in range(rounds + 1):
            started = time.perf_counter()
            version = policy_version(served.models.policy)[0]
            scores = converse(list(profiles.values()), base_url, token, r, sizes, bank, seed, held_out)
            entry = {"round": r, "policy_version": version, "seconds_serving": round(time.perf_counter() - started, 1),
                     **round_figures(scores, held_out, train, seed)}
            if r < rounds:
                time.sleep(LOG_BATCH_SECONDS + 3)   # the last conversations' batch is written
                # The pipeline's models.policy stays the warm-start (a round trains from the
                # policy the round before exported); the served config points at the new one.
                config = config.model_copy(update={"online": config.online.model_copy(update={"rounds": r + 1})})
                trained_at = time.perf_counter()
                results = run_stages(config)
                # A round with too few pairs trains nothing and keeps the policy (policy_spec).
                policy = served.models.policy.model_copy(update={"id": policy_spec(config, r + 2).id})
                served = config.model_copy(update={"models": config.models.model_copy(update={"policy": policy})})
                redeploy(served, token)
                entry |= {"pairs": results[f"round-{r + 1}/pairs"]["pairs"],
                          "train_pairs": results[f"round-{r + 1}/train"].get("train_pairs"),
                          "rows_read": results[f"round-{r + 1}/ingest"].get("rows_in"),
                          "seconds_training": round(time.perf_counter() - trained_at, 1)}
            figures.append(entry)
            log(f"round {r}: held-out satisfaction {entry['held_out']['mean']:.3f} "
                f"[{entry['held_out']['ci_low']:.3f}, {entry['held_out']['ci_high']:.3f}], "
                f"policy {version}, pairs {entry.get('pairs')}, {time.perf_counter() - started:.0f}s")
        close_chat_log()
    finally:
        serve.shutdown()
    first, last = figures[0]["per_user"], figures[-1]["per_user"]
    last_minus_first = paired_difference({u: last[u] for u in held_out & last.keys()},
                                         {u: first[u] for u in held_out & first.keys()}, seed=seed).to_json()
    personas = {user: text for user, (_, text) in load_serving_personas(run_dir).items()}   # the last round's
    users_now = [EvalUser(u, personas.get(u, ""), profiles[u]) for u in sorted(held_out)]
    gain_scores = {name: evaluate_arm(Arm(name, model, "pipeline"), users_now,
                                      requests_per_user=sizes.policy_gain_requests, samples=1, seed=seed,
                                      max_new_tokens=sizes.max_new_tokens, log=log)
                   for name, model in (("round_0_policy", base_model), ("last_policy", served.models.policy.id))}
    result = {"rounds": [{k: v for k, v in f.items() if k != "per_user"} for f in figures],
              "last_minus_first": last_minus_first,
              "policy_gain": paired_difference(gain_scores["last_policy"], gain_scores["round_0_policy"],
                                               seed=seed).to_json(),
              "users": {"total": len(profiles), "held_out": len(held_out), "train": len(train)},
              "seed": seed, "sizes": asdict(sizes), "seconds": round(time.perf_counter() - t0, 1),
              "per_user": [f["per_user"] for f in figures]}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text(markdown(result) + "\n")
    plot(result, out / "results.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| round | held-out satisfaction | 95% CI | training users | pairs | policy | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        h = r["held_out"]
        seconds = r["seconds_serving"] + r.get("seconds_training", 0)
        lines.append(f"| {r['round']} | {h['mean']:.3f} | [{h['ci_low']:.3f}, {h['ci_high']:.3f}] | "
                     f"{r['train']['mean']:.3f} | {r.get('pairs', '')} | {r['policy_version']} | {seconds:.0f} |")
    for key in ("last_minus_first", "policy_gain"):
        iv = result[key]
        lines.append(f"\n{key}: {iv['mean']:+.3f} [{iv['ci_low']:+.3f}, {iv['ci_high']:+.3f}]")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in result["rounds"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, color in (("held_out", "#c53"), ("train", "#79c")):
        means = [r[name]["mean"] for r in result["rounds"]]
        low = [m - r[name]["ci_low"] for m, r in zip(means, result["rounds"])]
        high = [r[name]["ci_high"] - m for m, r in zip(means, result["rounds"])]
        ax.errorbar(rounds, means, yerr=[low, high], marker="o", capsize=3, color=color,
                    label="held-out users" if name == "held_out" else "training users")
    ax.set_xlabel("round (policy served)")
    ax.set_ylabel("satisfaction (checker)")
    ax.set_xticks(rounds)
    ax.legend()
    ax.set_title("Satisfaction by round (95% CI over users)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhi sim loop", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of serve -> log -> train -> redeploy")
    parser.add_argument("--quick", action="store_true", help="the small size (80 users; 3 rounds in about 10 min on 2 CPUs)")
    parser.add_argument("--users", type=int, default=None, help="simulated users (default: the size's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sim-loop")
    parser.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    result = run_loop(rounds=args.rounds, users=args.users, seed=args.seed, out=args.out, quick=args.quick)
    print(markdown(result))
    print(f"{result['seconds']:.0f}s; table, plot and results.json in {args.out}")
    if args.json:
        print(json.dumps({k: result[k] for k in ("rounds", "last_minus_first", "policy_gain")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
