"""Benchmark: DPO steps per second, the `train` stage on Ray Train against plain TRL.

    .venv/bin/python bench/train_dpo.py            # SmolLM2-135M, 64 pairs, 12 steps
    .venv/bin/python bench/train_dpo.py --quick    # the tests' tiny Llama, 32 pairs, 40 steps
                                                   # (steps of ~50 ms: more of them, less noise)
    .venv/bin/python bench/train_dpo.py --quick --json --workdir /tmp/b

Top to bottom:
1. write synthetic pairs (PAIRS schema, prompts of about 100 tokens of the policy's
   tokenizer, chat template included) as a committed `pairs` stage, once per run directory;
2. `trl`: in this process, `pipelines.stages.train.dpo_worker.build_dpo_trainer` (the very DPOTrainer
   the Ray workers build) as rank 0 of 1, with `torch.set_num_threads` equal to the Ray
   workers' `cpus_per_worker`; a callback records the time at the end of every step;
3. `ray 1`, `ray 2`: `pipelines.stages.train.stage.run_train` with 1 and 2 workers of 1 CPU each, on a
   local Ray with num_cpus=2; `ray 1 precompute`: 1 worker with
   `train.precompute_ref_log_probs`. Per-step times come from rank 0's TensorBoard events
   (one `train/loss` scalar per step, `logging_steps=1`, stamped with the wall time);
4. steady state: the first WARMUP_STEPS steps are dropped and the median of the remaining
   step times is taken. Start-up is reported apart: for `trl`, building the trainer; for
   Ray, the stage's `seconds` minus the steady steps' time (worker start, model load,
   warm-up steps, reference precompute, final checkpoint and export).

Figures, each against its baseline measured in the same run:
- `ray_1worker_ratio`: steps/s of Ray Train with 1 worker over plain TRL (goal >= 0.9);
- `scaling_2workers_ratio`: samples/s with 2 workers over 1 (a step of 2 workers trains
  twice the pairs; 2.0 would be perfect scaling);
- `precompute_ref_ratio`: steps/s of 1 worker with precomputed reference log-probs over
  without (the reference forward pass leaves the step).

How to read it: the runs take turns on the same CPUs, so anything else running on the
machine moves the ratios; the load average before and after is printed (and in the JSON).
With 2 workers on 2 cores, any other load takes a core from one worker, and the all-reduce
waits for the slower one. `--json` prints one JSON object as the last line of stdout; only
the three figures above end in `_ratio`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WARMUP_STEPS = 3
PROMPT_TOKENS = 100
WORDS = ("the a user asked about weather travel code python data model train answer question short "
         "long because when where how why please explain again with more detail and less noise "
         "review summary list table report plan budget meeting email draft idea project team").split()


def make_pairs_run(run_dir: Path, tokenizer, pairs: int, seed: int) -> Path:
    """`run_dir` with a committed `pairs` stage of `pairs` synthetic training pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.prompts import base_system_prompt
    from pipelines.schema import PAIRS
    from pipelines.contract import StageWriter, read_manifest

    if read_manifest(run_dir, "pairs") is not None:
        return run_dir
    rng = random.Random(seed)
    system = {"role": "system", "content": base_system_prompt()}
    rows = []
    for i in range(pairs):
        words: list[str] = []
        while prompt_tokens(tokenizer, [system, {"role": "user", "content": " ".join(words)}]) < PROMPT_TOKENS:
            words.extend(rng.choices(WORDS, k=4))
        answer = " ".join(rng.choices(WORDS, k=12))
        rows.append({"pair_id": f"{i:06d}", "prompt": [system, {"role": "user", "content": " ".join(words)}],
                     "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": answer + " " + " ".join(rng.choices(WORDS, k=20))}],
                     "user_id": f"user-{i % 8}", "split": "train", "source": "rewrite", "margin": 0.5,
                     "persona_id": None, "conversation_id": f"c{i}", "followup_id": f"f{i}",
                     "sample_id": None, "round": 0})
    with StageWriter(run_dir, "pairs") as stage:
        pq.write_table(pa.Table.from_pylist(rows, schema=PAIRS), stage.table_dir("pairs") / "part-0.parquet")
        stage.commit(config_hash="bench", inputs=[], counts={"pairs": len(rows)}, seed=seed)
    return run_dir


def prompt_tokens(tokenizer, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def run_config(run_dir: Path, policy: str, steps: int, workers: int, precompute: bool = False):
    from pipelines.config import parse_config

    return parse_config({
        "run_dir": str(run_dir), "seed": 0, "models": {"policy": {"id": policy}},
        "train": {"workers": workers, "cpus_per_worker": 1, "per_device_batch_size": 2,
                  "max_steps": steps, "save_steps": steps + 1, "logging_steps": 1, "max_length": 256,
                  "precompute_ref_log_probs": precompute, "resources_timeout_s": 120},
        "resources": {"num_cpus": 2, "progress_bars": False}})


def steady(step_ends: list[float]) -> tuple[float, float]:
    """(median seconds per step, seconds of the steady steps) from the times steps ended:
    step k's time is end(k) - end(k-1), and steps 1..WARMUP_STEPS are dropped."""
    times = [b - a for a, b in zip(step_ends[WARMUP_STEPS - 1:], step_ends[WARMUP_STEPS:])]
    if len(times) < 3:
        raise SystemExit(f"only {len(times)} steady steps after {WARMUP_STEPS} warm-up steps: raise max_steps")
    return statistics.median(times), sum(times)


def plain_trl(run_dir: Path, policy: str, steps: int, threads: int) -> dict[str, Any]:
    """The workers' DPOTrainer in this process, rank 0 of 1, with `threads` torch threads."""
    import torch
    from transformers import TrainerCallback

    from pipelines.schema import table_path
    from pipelines.stages.train.dpo_worker import build_dpo_trainer

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    scratch = Path(tempfile.mkdtemp(prefix="bench-dpo-trl-"))
    job = {"train": run_config(run_dir, policy, steps, 1).train.model_dump(mode="json"),
           "pairs": str(table_path(run_dir, "pairs", "pairs")), "policy": policy, "storage": str(scratch),
           "scratch": str(scratch), "seed": 0, "save": False, "tensorboard": False}
    torch.set_num_threads(threads)
    callback = StepEnds()
    start = time.perf_counter()
    trainer = build_dpo_trainer(job, rank=0, world=1, callbacks=[callback])
    build_s = time.perf_counter() - start
    # The Trainer prints each step's logs; a Ray worker's go to its log file, so to a file here too.
    with open(scratch / "stdout.log", "w") as log, contextlib.redirect_stdout(log):
        trainer.train()
    step_s, _ = steady(callback.ends)
    return {"step_s": step_s, "startup_s": build_s, "samples_per_step": 2}


def ray_stage(run_dir: Path, policy: str, steps: int, workers: int, precompute: bool = False) -> dict[str, Any]:
    """The `train` stage; per-step times from rank 0's TensorBoard `train/loss` events."""
    from pipelines.stages.train.stage import run_train

    summary = run_train(run_config(run_dir, policy, steps, workers, precompute))
    ends = loss_event_times(Path(summary["output"]) / "storage" / "tensorboard")
    if sorted(ends) != list(range(1, steps + 1)):
        raise SystemExit(f"expected a train/loss event for steps 1..{steps}, got steps {sorted(ends)}")
    step_s, steady_s = steady([ends[step] for step in range(1, steps + 1)])
    return {"step_s": step_s, "startup_s": summary["seconds"] - steady_s, "samples_per_step": 2 * workers}


def loss_event_times(folder: Path) -> dict[int, float]:
    """Step -> wall time of its `train/loss` scalar, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times: dict[int, float] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            times.update({event.step: event.wall_time for event in events.Scalars("train/loss")})
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 32 pairs, 40 steps (about a minute)")
    parser.add_argument("--workdir", type=Path, help="keep models, pairs and runs here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-dpo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pairs, steps = (32, 40) if args.quick else (64, 12)

    if args.quick:
        from tiny_models import build_all

        policy = str(build_all(workdir / "models").causal_lm)
    else:
        from actors.models import resolve_model

        policy = resolve_model("smollm2-135m-instruct")
        if not (Path(policy) / "config.json").is_file():
            raise SystemExit(f"SmolLM2-135M is not installed at {policy}: run `make models`, or use --quick")

    import ray
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=False)
    runs = {name: make_pairs_run(workdir / f"run-{name}", tokenizer, pairs, seed=0)
            for name in ("trl", "ray1", "ray2", "ray1-precompute")}
    load_before = os.getloadavg()
    results = {"trl": plain_trl(runs["trl"], policy, steps, threads=1)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results["ray1"] = ray_stage(runs["ray1"], policy, steps, workers=1)
    results["ray2"] = ray_stage(runs["ray2"], policy, steps, workers=2)
    results["ray1-precompute"] = ray_stage(runs["ray1-precompute"], policy, steps, workers=1, precompute=True)
    ray.shutdown()
    load_after = os.getloadavg()

    steps_per_s = {name: 1 / r["step_s"] for name, r in results.items()}
    samples_per_s = {name: r["samples_per_step"] / r["step_s"] for name, r in results.items()}
    report: dict[str, Any] = {
        "policy": Path(policy).name, "pairs": pairs, "max_steps": steps, "warmup_steps": WARMUP_STEPS,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
    }
    for name, r in results.items():
        key = name.replace("-", "_")
        report[f"{key}_steps_per_s"] = round(steps_per_s[name], 3)
        report[f"{key}_samples_per_s"] = round(samples_per_s[name], 3)
        report[f"{key}_startup_s"] = round(r["startup_s"], 2)
    report["ray_1worker_ratio"] = round(steps_per_s["ray1"] / steps_per_s["trl"], 3)
    report["scaling_2workers_ratio"] = round(samples_per_s["ray2"] / samples_per_s["ray1"], 3)
    report["precompute_ref_ratio"] = round(steps_per_s["ray1-precompute"] / steps_per_s["ray1"], 3)

    print(f"DPO on {report['policy']}: {pairs} pairs, prompts ~{PROMPT_TOKENS} tokens, batch 2 per worker, "
          f"{steps} steps ({WARMUP_STEPS} warm-up dropped, median of the rest)")
    print(f"  load average before {report['load_avg_before']}, after {report['load_avg_after']} (2 cores)")
    print(f"  {'run':<34}{'steps/s':>9}{'samples/s':>11}{'start-up s':>12}")
    labels = {"trl": "plain TRL, 1 thread", "ray1": "Ray Train, 1 worker x 1 CPU",
              "ray2": "Ray Train, 2 workers x 1 CPU", "ray1-precompute": "Ray Train, 1 worker, precomputed ref"}
    for name, label in labels.items():
        print(f"  {label:<34}{steps_per_s[name]:>9.3f}{samples_per_s[name]:>11.3f}{results[name]['startup_s']:>12.1f}")
    print(f"  ray_1worker_ratio (steps/s, Ray 1 worker / plain TRL; goal >= 0.9): {report['ray_1worker_ratio']}")
    print(f"  scaling_2workers_ratio (samples/s, 2 workers / 1): {report['scaling_2workers_ratio']}")
    print(f"  precompute_ref_ratio (steps/s, precomputed ref / not): {report['precompute_ref_ratio']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
