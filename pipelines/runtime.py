"""Starting or joining Ray for a run."""
from __future__ import annotations

import logging
import os

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
