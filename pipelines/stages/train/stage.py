"""Stage `train`: persona-DPO on the pairs, with TRL's DPOTrainer on Ray Train.

Top to bottom: read the round's pairs (training users only; evaluation users' pairs measure
reward accuracy at the end), check that Ray has the workers' resources, run a
`TorchTrainer` whose workers each run `pipelines/stages/train/dpo_worker.py`, then publish the exported
policy, the checkpoints, the per-step metrics and the ledger of pairs seen.

Checkpoints live under `<round_dir>/.train-storage/<key>/` while the stage runs (`key`
hashes the train settings, the pairs and the policy), so rerunning an interrupted stage
finds them and resumes: Ray Train resumes a run given the same storage path and name.
Within one `fit()`, `FailureConfig(max_failures)` restarts a failed worker group from the
newest checkpoint. When the stage commits, the storage folder moves into `<round_dir>/train/`.
In a run kept in object storage (pipelines/storage.py) Ray Train writes the checkpoints to
the store at the same relative place, and publishing the stage carries them into
`train/storage/ray` there.

Round k >= 1 starts from the policy round k-1 exported, which is also the reference:
DPOTrainer copies the starting model as its reference when given none. An online round
with fewer pairs than one global batch finishes without training (`skip_round`) and keeps
the policy it started from; in round 0 that is an error saying what to change.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.models import ModelSpec, resolve_model
from pipelines.config import RunConfig
from pipelines import storage as run_storage
from pipelines.stages.train import tracking
from pipelines.stages.train.dpo_worker import (EXPORT, RESULT, coverage, load_policy_tokenizer, prepare_pairs,
                                  read_ledger, steps_per_epoch, train_loop_per_worker)
from pipelines.rounds import policy_spec
from pipelines.schema import MODEL_FOLDER, round_dir, stage_dir, table_path
from pipelines.contract import StageWriter, model_content, require_stage

STAGE = "train"
STORAGE = ".train-storage"
# Fault injection for end-to-end tests that go through the driver: a worker dies once at this
# step of every train step the process runs, and Ray Train resumes from the last checkpoint.
FAIL_AT_STEP_ENV = "RLHI_TEST_TRAIN_FAIL_AT_STEP"


def run_key(config: RunConfig, policy: str, pairs_manifest: dict[str, Any]) -> str:
    """Names the training run: same settings, pairs and policy -> same checkpoints. The
    policy counts by what its folder holds too, so a model exported again into the same
    folder never resumes checkpoints trained from the old one."""
    blob = json.dumps({"train": config.train.model_dump(mode="json"), "seed": config.seed,
                       "policy": policy, "policy_content": model_content(policy, config.run_dir),
                       "pairs": pairs_manifest["started_at"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Checkpoints:
    """Where Ray Train keeps a run's checkpoints: `<storage>/ray` on disk, or the same place
    in the run's object store when it has one."""

    def __init__(self, storage: Path) -> None:
        self.remote = run_storage.REMOTE_RUN.get()
        if self.remote is None:
            self.path, self.filesystem = str(storage), None
        else:
            self.path, self.filesystem = self.remote.train_storage(storage)

    def names(self) -> list[str]:
        if self.remote is None:
            return sorted(p.name for p in (Path(self.path) / "ray").glob("checkpoint_*") if p.is_dir())
        return [name for name in self.remote.names(f"{self.path}/ray", folders_only=True) if name.startswith("checkpoint_")]

    def exist(self) -> bool:
        return (Path(self.path) / "ray").is_dir() if self.remote is None else bool(self.remote.names(f"{self.path}/ray"))

    def carry_into(self, local_folder: Path) -> None:
        """In the store, have the stage's publication move the checkpoints to `local_folder`'s
        place (on disk they moved with the storage folder)."""
        if self.remote is not None:
            self.remote.carry_on_publish(f"{self.path}/ray", local_folder)


def wait_for_resources(cpus: float, gpus: float, timeout_s: float) -> None:
    """Block until Ray has the workers' CPUs and GPUs free; else fail naming what holds them.

    Ray Train would wait forever; on a small machine the usual cause is an actor pool or
    Serve replica left alive by an earlier stage.
    """
    import ray

    deadline = time.time() + timeout_s
    while True:
        free = ray.available_resources()
        if free.get("CPU", 0) >= cpus - 1e-9 and free.get("GPU", 0) >= gpus - 1e-9:
            return
        if time.time() > deadline:
            break
        time.sleep(1.0)
    from ray.util.state import list_actors

    holders = [f"{a.class_name} (pid {a.pid}, {a.required_resources})"
               for a in list_actors(filters=[("state", "=", "ALIVE")], limit=50)
               if a.required_resources]
    raise RuntimeError(
        f"train: needs {cpus:g} CPU and {gpus:g} GPU free for its workers but Ray has "
        f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free after {timeout_s:g} s "
        f"(train.resources_timeout_s). Actors holding resources: {holders or 'none'}. "
        "Stop them, or lower train.workers / train.cpus_per_worker.")


def skip_round(config: RunConfig, round_index: int, upstream: dict[str, Any], policy: ModelSpec,
               policy_path: str, reason: str) -> dict[str, Any]:
    """An online round with too few pairs to train (a quiet period of the served logs)
    finishes without training: it exports nothing, so the next round and `rlhi redeploy`
    keep the policy the round started from (`pipelines.rounds.skipped_train`). Rerunning
    the round after its pairs grew trains it (its pairs are upstream of the stage)."""
    with StageWriter(config.run_dir, STAGE, round_index) as stage:
        summary = {"round": round_index, "policy": policy_path, "train_pairs": 0,
                   "skipped": f"too few pairs to train: {reason}; the round keeps the policy it started from"}
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, upstream=upstream, models=[policy.model_dump()], counts=summary)
    print(f"train: round {round_index} skipped: {summary['skipped']}", flush=True)
    summary["output"] = str(stage_dir(config.run_dir, STAGE, round_index))
    return summary


def run_train(config: RunConfig, round_index: int = 0, *, fail_at_step: int | None = None) -> dict[str, Any]:
    """Run the stage into `<round_dir>/train/`; `fail_at_step` kills a worker once (tests;
    else $RLHI_TEST_TRAIN_FAIL_AT_STEP)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    settings = config.train
    if fail_at_step is None and os.environ.get(FAIL_AT_STEP_ENV):
        fail_at_step = int(os.environ[FAIL_AT_STEP_ENV])
    out_dir = round_dir(config.run_dir, round_index).resolve()
    upstream = {"pairs": require_stage(config.run_dir, "pairs", round_index)}
    pairs_dir = table_path(out_dir, "pairs", "pairs")
    global_batch = settings.per_device_batch_size * settings.workers
    policy = policy_spec(config, round_index)
    policy_path = resolve_model(policy.id)
    train, evaluation, left_out = prepare_pairs(str(pairs_dir), settings.sources, load_policy_tokenizer(policy_path),
                                                settings.max_length, global_batch)
    if not train:
        found = (f"{pairs_dir} has {len(train) + len(left_out['remainder'])} training pairs from sources "
                 f"{settings.sources} that fit train.max_length={settings.max_length} "
                 f"({len(left_out['too_long'])} prompts are longer); one global batch needs {global_batch} "
                 "(train.workers x train.per_device_batch_size)")
        if round_index == 0:
            raise RuntimeError(f"train: {found}. Lower those, raise max_length, or build more pairs.")
        return skip_round(config, round_index, upstream, policy, policy_path, found)
    key = run_key(config, policy_path, upstream["pairs"])
    storage = out_dir / STORAGE / key
    storage.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(storage)
    resumed_run = checkpoints.exist()

    wait_for_resources(settings.workers * settings.cpus_per_worker,
                       settings.workers * settings.gpus_per_worker, settings.resources_timeout_s)
    mlflow_run = tracking.start_run(config, round_index, policy_path, len(train))
    job = {"train": settings.model_dump(mode="json"), "pairs": str(pairs_dir), "policy": policy_path,
           "storage": str(storage), "scratch": str(Path(tempfile.gettempdir()) / f"rlhi-train-{key}"),
           "seed": config.seed, "fail_at_step": fail_at_step, "env": tracking.worker_environment(mlflow_run)}
    resources = {"CPU": settings.cpus_per_worker}
    if settings.gpus_per_worker:
        resources["GPU"] = settings.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(name="ray", storage_path=checkpoints.path, storage_filesystem=checkpoints.filesystem,
                                failure_config=FailureConfig(max_failures=settings.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        with StageWriter(config.run_dir, STAGE, round_index) as stage:
            started = time.time()
            try:
                result = trainer.fit()
            except Exception as error:  # Ray Train raises the workers' error once retries are spent
                raise RuntimeError(f"train: Ray Train failed after {settings.max_failures} retries "
                                   f"(train.max_failures); rerun the stage to resume from {storage}: "
                                   f"{error}") from error
            if result.error is not None:
                raise RuntimeError(f"train: Ray Train failed: {result.error}") from result.error
            final = json.loads((storage / RESULT).read_text())
            seen = coverage(read_ledger(storage), len(train),
                            steps_per_epoch(len(train), global_batch, settings.gradient_accumulation_steps))
            history = final.pop("log_history")
            shutil.move(str(storage / EXPORT), stage.tmp / MODEL_FOLDER)
            with open(stage.tmp / "metrics.jsonl", "w") as handle:
                for row in history:
                    handle.write(json.dumps(row) + "\n")
            summary = {
                "round": round_index, "policy": policy_path, "workers": settings.workers,
                "train_pairs": len(train), "eval_pairs": len(evaluation),
                "left_out_too_long": len(left_out["too_long"]), "left_out_remainder": len(left_out["remainder"]),
                "steps": final["global_step"], "epochs": settings.epochs if settings.max_steps < 0 else None,
                "final_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
                # One logged step's batch (logging_steps), not the training set: a trend, read
                # beside eval_reward_accuracy, which is over every evaluation pair.
                "last_step_reward_accuracy": next((r["rewards/accuracies"] for r in reversed(history)
                                                   if "rewards/accuracies" in r), None),
                "eval_reward_accuracy": final.get("eval_rewards/accuracies"),
                "eval_loss": final.get("eval_loss"),
                "train_wall_seconds": final["train_wall_seconds"],
                "resumed_from_step": final.get("resumed_from_step"), "resumed_run": resumed_run,
                "pairs_per_epoch": {str(k): v for k, v in seen.items()},
                "checkpoints": checkpoints.names(),
                "nodes": len({p.read_text() for p in (storage / "nodes").glob("rank-*")}),
                "seconds": round(time.time() - started, 3),
            }
            if mlflow_run:
                summary["mlflow"] = mlflow_run | {"link": tracking.run_link(mlflow_run)}
            (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
            shutil.move(str(storage), stage.tmp / "storage")
            checkpoints.carry_into(stage.final / "storage" / "ray")
            stage.commit(config=config, upstream=upstream, models=[policy.model_dump()], counts=summary)
    except BaseException:
        tracking.finish_run(mlflow_run, None, None)
        raise
    tracking.finish_run(mlflow_run, summary, str(stage_dir(config.run_dir, STAGE, round_index) / MODEL_FOLDER))
    shutil.rmtree(job["scratch"], ignore_errors=True)
    summary["output"] = str(stage_dir(config.run_dir, STAGE, round_index))
    return summary
