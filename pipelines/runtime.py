"""Starting or joining Ray for a run."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

from pipelines.config import ResourcesConfig


def start_ray(resources: ResourcesConfig) -> str | None:
    """Join the configured cluster, the one `ray job submit` provides (RAY_ADDRESS), or
    start a local Ray bound to this machine. Returns the dashboard URL when Ray has one.
    Does nothing if Ray is already up."""
    import ray

    if ray.is_initialized():
        return None
    address = resources.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"num_cpus": resources.num_cpus} if not address else {}
    context = ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, **kwargs)
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def map_tasks(fn: Callable, calls: list[tuple], use_ray: bool = True) -> list[Any]:
    """`fn(*call)` for every call, in call order: in as many Ray tasks as the cluster has
    CPUs (the calls dealt round-robin: a task per call would pay Ray's per-task cost once a
    file, hundreds of times at WildChat-1M), or in this process without `use_ray`.
    Sized by the cluster's CPUs, not the free ones: a stage's actors may still be releasing
    theirs."""
    if not use_ray:
        return _run_all(fn, calls)
    import ray

    tasks = max(1, min(len(calls), int(ray.cluster_resources().get("CPU", 1))))
    done = ray.get([_remote_runner().remote(fn, calls[i::tasks]) for i in range(tasks)])
    results: list[Any] = [None] * len(calls)
    for i, chunk_results in enumerate(done):
        results[i::tasks] = chunk_results
    return results


def in_ray_task(fn: Callable, *args: Any, num_gpus: float = 0.0) -> Any:
    """`fn(*args)` in one Ray task holding `num_gpus` GPUs and one CPU; its result (or its
    error) comes back here. For work whose models need a GPU that the driver's node may
    lack."""
    import ray

    return ray.get(ray.remote(num_cpus=1, num_gpus=num_gpus)(fn).remote(*args))


def _run_all(fn: Callable, calls: list[tuple]) -> list[Any]:
    return [fn(*args) for args in calls]


@functools.cache
def _remote_runner():
    import ray

    return ray.remote(num_cpus=1)(_run_all)
