"""Experiment tracking for the train stage: one MLflow run per train step.

With `train.report_to` naming `mlflow`, the stage opens a run before Ray Train starts
(experiment `train.mlflow_experiment` in the store `train.mlflow_tracking_uri`, else
`$MLFLOW_TRACKING_URI`, else a local SQLite store `<run_dir>/mlflow.db` with its artifacts
in `<run_dir>/mlflow-artifacts/`; MLflow 3 refuses its old `./mlruns` file store by
default), logs the run
configuration as parameters and as `rlhi_config.json`, and hands the run's id to the
workers: transformers' MLflowCallback on rank 0 resumes that run (`MLFLOW_RUN_ID`) and logs
TRL's per-step metrics into it. When the stage commits, the exported policy's path, the
summary's counts and the manifest's run key are added and the run is ended; a stage that
fails ends it as FAILED. `tensorboard` and `wandb` need nothing here (TRL's own `report_to`;
W&B reads its environment on the workers).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.config import RunConfig


def local_store(config: RunConfig) -> str:
    """The store used when none is configured: SQLite in the run directory."""
    return f"sqlite:///{Path(config.run_dir).resolve() / 'mlflow.db'}"


def tracking_uri(config: RunConfig) -> str:
    """The MLflow store this run logs to."""
    return config.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(config)


def _flat(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]
    return out


def start_run(config: RunConfig, round_index: int, policy: str, train_pairs: int) -> dict[str, str] | None:
    """Open the step's MLflow run (None when `mlflow` is not in train.report_to); returns
    what the workers and the summary need: tracking_uri, experiment, experiment_id, run_id."""
    if "mlflow" not in config.train.report_to:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = tracking_uri(config)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.train.mlflow_experiment)
    # A local store keeps its artifacts beside it (MLflow's default is ./mlruns under the
    # current directory); a tracking server keeps its own artifact store.
    local = uri == local_store(config)
    artifacts = (Path(config.run_dir).resolve() / "mlflow-artifacts").as_uri() if local else None
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        config.train.mlflow_experiment, artifact_location=artifacts)
    run = client.create_run(experiment_id, run_name=f"{Path(config.run_dir).name}/round-{round_index}/train",
                            tags={"rlhi.run_dir": str(Path(config.run_dir).resolve()), "rlhi.round": str(round_index),
                                  "rlhi.stage": "train"})
    settings = config.model_dump(mode="json")
    params = _flat("", {"train": settings["train"], "seed": config.seed, "policy": policy,
                        "train_pairs": train_pairs, "ablation": settings.get("ablation")}, {})
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a call
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    client.log_dict(run.info.run_id, settings, "rlhi_config.json")
    return {"tracking_uri": uri, "experiment": config.train.mlflow_experiment, "experiment_id": experiment_id,
            "run_id": run.info.run_id}


def worker_environment(run: dict[str, str] | None) -> dict[str, str]:
    """What rank 0's MLflowCallback reads to log into the stage's run."""
    if run is None:
        return {}
    return {"MLFLOW_TRACKING_URI": run["tracking_uri"], "MLFLOW_EXPERIMENT_NAME": run["experiment"],
            "MLFLOW_RUN_ID": run["run_id"], "MLFLOW_FLATTEN_PARAMS": "true"}


def finish_run(run: dict[str, str] | None, summary: dict[str, Any] | None, exported_model: str | None) -> None:
    """Record the exported policy and the counts, and end the run (FAILED without a summary)."""
    if run is None:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(run["tracking_uri"])
    if summary is None:
        client.set_terminated(run["run_id"], status="FAILED")
        return
    client.set_tag(run["run_id"], "rlhi.exported_model", exported_model)
    client.log_batch(run["run_id"], params=[Param("exported_model", exported_model)])
    client.log_dict(run["run_id"], summary, "train_summary.json")
    client.set_terminated(run["run_id"], status="FINISHED")


def run_link(run: dict[str, str]) -> str:
    """Where the run is: the store and the run's path in the MLflow UI."""
    return f"{run['tracking_uri']}#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
