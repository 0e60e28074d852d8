"""Throughput and latency of POST /v1/score, batched vs unbatched, against the offline limit.

    python bench/serve_reward.py [--quick] [--json]

The reward model is the `trained` backend on all-MiniLM-L6-v2 with a freshly initialised,
explicitly seeded one-output head (`init_trained_reward_model`): its scores mean nothing,
its cost is exactly that of the trained model, which is what throughput needs.

1. offline limit: the same model scores the same requests in full batches, no HTTP, at the
   served batch size (32 requests) and at 4 requests, in the parent process, in windows
   that alternate with the served ones at 32 clients: the ratio of the two,
   `offline_batching_ratio`, is the most batching can gain on this CPU;
2. two Serve apps side by side (gateway + one reward replica each): `serve.batch` with
   max_batch_size 32 under /batched, max_batch_size 1 under /unbatched;
3. an async load generator in its own process (aiohttp, closed loop) at 1, 8 and 32
   concurrent clients, alternating between the two apps window by window (so other load
   on the machine hits both alike): requests/s, p50 and p99 latency.
Prints `batching_ratio` (batched / unbatched requests/s at 32 clients),
`served_over_offline_ratio` (batched at 32 clients / offline at 32),
`offline_batching_ratio` and `batching_over_offline_batching_ratio` (how much of that
ceiling the server reaches), each figure with the 1-minute load average when it was taken.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONCURRENCY = (1, 8, 32)
SERVED_BATCH, SMALL_BATCH = 32, 4
CANDIDATES_PER_REQUEST = 4
TOPICS = ["sort a list in Python", "the French revolution", "a haiku about rain",
          "explain TCP handshakes", "a polite complaint letter", "compound interest"]


def make_requests(n: int) -> list[dict]:
    """n distinct, realistic-length score requests (persona, one user turn, 4 candidates)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append({
            "persona": f"User {i}: prefers short, concrete answers; often asks about {topic}.",
            "messages": [{"role": "user", "content": f"Please help me with {topic}. (#{i})"}],
            "candidates": [f"Answer {k} about {topic}: " + "some detail " * (4 + 3 * k)
                           for k in range(CANDIDATES_PER_REQUEST)]})
    return out


# ---------------------------------------------------------------- load generator (child)

async def _load(url: str, token: str, concurrency: int, duration_s: float,
                requests: list[dict]) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.perf_counter() + duration_s

    async def worker(k: int, session) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            async with session.post(url, json=requests[i % len(requests)]) as response:
                await response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
            i += concurrency

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(k, session) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "elapsed_s": elapsed}


def summarize(windows: list[dict]) -> dict:
    """requests/s and latency percentiles over several measurement windows."""
    latencies = sorted(x for w in windows for x in w["latencies"])
    elapsed = sum(w["elapsed_s"] for w in windows)
    pick = lambda q: round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)  # noqa: E731
    return {"requests": len(latencies), "errors": sum(w["errors"] for w in windows),
            "rps": round(len(latencies) / elapsed, 2),
            "p50_ms": pick(0.50) if latencies else None,
            "p99_ms": pick(0.99) if latencies else None}


def run_load(url: str, token: str, concurrency: int, duration_s: float, pool: int) -> dict:
    """Run the load generator in its own process so it does not share our interpreter."""
    env = {**os.environ, "RLHI_BENCH_TOKEN": token}
    out = subprocess.run([sys.executable, __file__, "--load", url, "--concurrency",
                          str(concurrency), "--duration", str(duration_s), "--pool", str(pool)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- server side (parent)

def make_model(folder: Path) -> Path:
    """MiniLM with a seeded one-output head, saved as a `trained` reward model."""
    import torch

    from actors.reward_model import init_trained_reward_model

    torch.manual_seed(0)
    model, tokenizer = init_trained_reward_model()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def offline_window(model, requests: list[dict], batch: int) -> dict:
    """One offline window: the RewardModel scores every request in batches of `batch`
    (a load-generator window's shape, so `summarize` reads both)."""
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        t0 = time.perf_counter()
        model.score_batch(*_columns(requests[i:i + batch]))
        latencies += [time.perf_counter() - t0] * len(requests[i:i + batch])
    return {"latencies": latencies, "errors": 0, "elapsed_s": time.perf_counter() - start}


def offline_models(model_dir: Path, requests: list[dict]) -> dict[int, object]:
    """The RewardModel at the served batch size and at SMALL_BATCH, warmed up."""
    from actors.reward_model import RewardModel

    models = {b: RewardModel("trained", {"id": str(model_dir), "engine": "transformers",
                                         "batch_size": b * CANDIDATES_PER_REQUEST})
              for b in (SERVED_BATCH, SMALL_BATCH)}
    for b, model in models.items():
        model.score_batch(*_columns(requests[:b]))
    return models


def _columns(chunk: list[dict]):
    return ([r["persona"] for r in chunk], [r["messages"] for r in chunk],
            [r["candidates"] for r in chunk])


def mean_pair_tokens(model_dir: Path, requests: list[dict]) -> float:
    """Tokens the encoder reads per (prompt, candidate) pair: what the compute scales with."""
    from actors.reward_model import RewardModel, encoder_prompt_text

    scorer = RewardModel("trained", {"id": str(model_dir), "engine": "transformers"}).scorer
    sizes = [len(scorer.tokenizer(encoder_prompt_text(r["persona"], r["messages"], c, scorer),
                                  c)["input_ids"])
             for r in requests[:16] for c in r["candidates"]]
    return sum(sizes) / len(sizes)


def deploy(model_dir: Path, port: int, token: str, max_batch_size: int, name: str) -> str:
    """The app with one reward replica at this batch size, under /<name>; returns its URL."""
    from ray import serve

    from pipelines.config import parse_config
    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient
    from serve.guard import token_digest

    config = parse_config({"models": {"reward": {"id": str(model_dir), "engine": "transformers",
                                                 "batch_size": 128}},
                           "serve": {"port": port, "rewrite": {"enabled": False},
                                     "chat": {"enabled": False},
                                     "reward": {"backend": "trained", "num_cpus": 1,
                                                "max_batch_size": max_batch_size,
                                                "batch_wait_timeout_s": 0.005,
                                                "max_ongoing_requests": 64}}})
    serve.run(build_app(config, token_digest(token)), name=f"{APP_NAME}-{name}",
              route_prefix=f"/{name}")
    RLHIClient(f"http://127.0.0.1:{port}/{name}", token).wait_healthy(timeout_s=180)
    return f"http://127.0.0.1:{port}/{name}/v1/score"


def _loadavg() -> str:
    """The 1-minute load average, printed beside every figure: this machine is shared."""
    return f"  (load {os.getloadavg()[0]:.2f})"


def other_benchmarks() -> list[str]:
    """Other benchmark processes on this machine: our numbers are contended if any."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line.strip()[:100] for line in out.splitlines()
            if "bench/" in line and "serve_reward" not in line and "grep" not in line]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--port", type=int, default=8017)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:  # the child: generate load, print one JSON line
        result = asyncio.run(_load(args.load, os.environ["RLHI_BENCH_TOKEN"], args.concurrency,
                                   args.duration, make_requests(args.pool)))
        print(json.dumps(result))
        return 0

    import ray
    from ray import serve

    duration, rounds = (4.0, 2) if args.quick else (10.0, 3)
    # The same request pool is scored offline and sent by the load generator.
    pool = 64 if args.quick else 256
    requests = make_requests(pool)
    contention = other_benchmarks()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "minilm-rm")
        tokens = mean_pair_tokens(model_dir, requests)
        print(f"{tokens:.0f} tokens per (prompt, candidate) pair", flush=True)
        offline = offline_models(model_dir, requests)
        token = secrets.token_urlsafe(16)
        # Each replica reserves 1 of the 2 CPUs but may use both threads, like the offline
        # run: only one of the two variants is under load at any time.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        windows: dict[str, list[dict]] = {}
        try:
            # Both variants side by side, measured in alternating windows, so load from
            # anything else on the machine falls on both alike.
            urls = {name: deploy(model_dir, args.port, token, batch, name)
                    for name, batch in (("batched", 32), ("unbatched", 1))}
            for url in urls.values():
                run_load(url, token, 4, 2.0, pool)  # warm-up
            for c in CONCURRENCY:
                for _ in range(rounds):
                    for name, url in urls.items():
                        windows.setdefault(f"{name}_c{c}", []).append(
                            run_load(url, token, c, duration, pool))
                    if c == CONCURRENCY[-1]:  # the offline limits in the same alternation
                        for b, model in offline.items():
                            windows.setdefault(f"offline_batch{b}", []).append(
                                offline_window(model, requests, b))
                for name in urls:
                    result = summarize(windows[f"{name}_c{c}"])
                    print(f"{name:9} {c:2} clients: {result['rps']:7.1f} req/s  p50 "
                          f"{result['p50_ms']} ms  p99 {result['p99_ms']} ms  "
                          f"errors {result['errors']}{_loadavg()}", flush=True)
            for b in offline:
                print(f"offline, batches of {b:2} requests: "
                      f"{summarize(windows[f'offline_batch{b}'])['rps']:7.1f} req/s (no HTTP)"
                      f"{_loadavg()}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    contention = sorted(set(contention) | set(other_benchmarks()))
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    settings = {key: summarize(w) for key, w in windows.items()}
    served, unbatched = settings[f"batched_c{CONCURRENCY[-1]}"], settings[f"unbatched_c{CONCURRENCY[-1]}"]
    limit, small = settings[f"offline_batch{SERVED_BATCH}"], settings[f"offline_batch{SMALL_BATCH}"]
    batching = served["rps"] / unbatched["rps"]
    offline_batching = limit["rps"] / small["rps"]
    report = {
        "batching_ratio": round(batching, 3),
        "served_over_offline_ratio": round(served["rps"] / limit["rps"], 3),
        "offline_batching_ratio": round(offline_batching, 3),
        "batching_over_offline_batching_ratio": round(batching / offline_batching, 3),
        "offline_rps": limit["rps"], "offline_rps_small_batch": small["rps"],
        "mean_pair_tokens": round(tokens, 1), "settings": settings,
        "candidates_per_request": CANDIDATES_PER_REQUEST, "request_pool": pool,
        "window_s": duration, "windows": rounds,
        "cpus": os.cpu_count(), "contended_by": contention,
        "loadavg_1min_before_after": load}
    print(f"offline batching (batch {SERVED_BATCH} / batch {SMALL_BATCH}): "
          f"{report['offline_batching_ratio']}x, the ceiling on this CPU"
          + (f" (below 3: the aim is batching_ratio >= 0.8 x {report['offline_batching_ratio']}"
             f" = {0.8 * offline_batching:.2f})" if offline_batching < 3 else ""), flush=True)
    print(f"batching: {report['batching_ratio']}x at 32 clients "
          f"({report['batching_over_offline_batching_ratio']} of the ceiling); served / offline: "
          f"{report['served_over_offline_ratio']}"
          + (f"  (under contention: {len(contention)} other benchmark processes)"
             if contention else "") + f"; 1-min load average before/after {load}", flush=True)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
