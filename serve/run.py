"""`rlhi serve`: run the application in the foreground until SIGINT or SIGTERM.

Refuses to start without a token, starts (or joins) Ray, binds Serve's HTTP proxy to the
configured host and port, waits for /healthz, prints the URLs, and on a signal writes the
chat log's open batch (printing how many conversations it wrote and lost), shuts down
Serve and, if it started Ray itself, that Ray too.

`rlhi redeploy` (`redeploy_command`): from another shell or a job, put a newly trained
policy live in that running application without downtime (`redeploy`).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from pipelines.config import RunConfig
from serve.guard import read_token, token_digest

ENDPOINTS = ("POST /v1/score", "POST /v1/rewrite", "POST /v1/chat/completions",
             "GET /v1/models", "GET /healthz", "GET /docs")


def stop_handler(stop: threading.Event, serving: threading.Event):
    """The SIGINT/SIGTERM handler of `serve_forever`: once serving, ask it to stop (it closes
    the chat log, then shuts Serve down); while it is still starting (models loading, a
    replica failing health checks for up to 10 minutes), interrupt the start at once."""
    def handle(signum: int, frame: Any) -> None:
        stop.set()
        if not serving.is_set():
            raise KeyboardInterrupt(f"rlhi serve: stopped while starting (signal {signum})")
    return handle


def serve_forever(config: RunConfig, port: int | None = None,
                  stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve `config` until a signal (or `stop` is set); returns what was served."""
    import ray
    from ray import serve

    from pipelines.runtime import start_ray
    from serve.app import APP_NAME, build_app
    from serve.client import RLHIClient

    token = read_token(config.serve.token_file)  # before anything starts: no token, no server
    settings = config.serve.model_copy(update={"port": port}) if port else config.serve
    started_ray = not ray.is_initialized()
    start_ray(config.resources)
    stop, serving = stop or threading.Event(), threading.Event()
    previous = {sig: signal.signal(sig, stop_handler(stop, serving))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    base = f"http://{settings.host}:{settings.port}"
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(config.model_copy(update={"serve": settings}), token_digest(token)),
                  name=APP_NAME, route_prefix="/")
        RLHIClient(base, token).wait_healthy(timeout_s=600)
        apps = [name for name in ("reward", "rewrite", "chat") if getattr(settings, name).enabled]
        print(f"rlhi serve: {', '.join(apps)} on {base}", flush=True)
        for endpoint in ENDPOINTS:
            method, path = endpoint.split()
            print(f"  {method:5} {base}{path}", flush=True)
        print("  (Authorization: Bearer $RLHI_API_TOKEN; Ctrl-C to stop)", flush=True)
        serving.set()
        if settings.chat.enabled and settings.chat.log.enabled:
            print(f"  chat log: {settings.chat.log.folder}", flush=True)
        stop.wait()
        print("rlhi serve: shutting down", flush=True)
        if settings.chat.enabled and settings.chat.log.enabled:
            close_chat_log()
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"url": base, "apps": [n for n in ("reward", "rewrite", "chat")
                                  if getattr(settings, n).enabled]}


def redeploy(config: RunConfig, token: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Put `config` (typically a newly trained `models.policy`) live in the running
    application, without downtime: Serve updates in place only the deployments whose
    arguments changed, starting their new replicas and stopping the old ones once the new
    are ready, and an old replica finishes the requests it holds before it stops. The chat
    log's deployment is unchanged, so it keeps its open batch and the log records which
    policy version answered each turn. Returns the served policy as `/v1/models` lists it."""
    from ray import serve

    from serve.app import APP_NAME, build_app

    serve.run(build_app(config, token_digest(token)), name=APP_NAME, route_prefix="/")
    info = serve.get_deployment_handle("chat", APP_NAME).info.remote().result(timeout_s=timeout_s)
    print(f"rlhi serve: now serving {info['id']} (policy version {info['policy_version']})", flush=True)
    return info


def redeploy_command(config: RunConfig, policy: str | None = None) -> dict[str, Any]:
    """`rlhi redeploy`: join the cluster that runs `rlhi serve` (resources.address,
    RAY_ADDRESS, else the local one) and put `policy` live there, by default the newest
    policy the run trained (the last round whose train stage finished)."""
    import ray
    from ray import serve

    from pipelines.rounds import last_train_round, trained_policy
    from pipelines.schema import model_path
    from pipelines.storage import local_copy
    from serve.app import APP_NAME

    token = read_token(config.serve.token_file)
    if policy is None:
        # A run in object storage is pulled into its working copy first, as `rlhi serve` does.
        local = config.model_copy(update={"run_dir": str(local_copy(config.run_dir, config.work_dir))})
        try:
            policy = str(model_path(local.run_dir, "train", last_train_round(local)))
        except RuntimeError as exc:   # no round trained yet: the user's to fix, not a crash
            raise ValueError(f"nothing to redeploy: {exc}") from exc
    if not (Path(policy) / "config.json").is_file():
        raise ValueError(f"--policy {policy}: not an exported model folder (no config.json there)")
    address = config.resources.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise ValueError(f"no running Ray cluster at {address!r} ({exc}): start `rlhi serve --config FILE` "
                           "first, or set resources.address / RAY_ADDRESS to the cluster that runs it") from exc
    try:
        if APP_NAME not in serve.status().applications:
            raise ValueError(f"the Ray cluster at {address!r} serves no {APP_NAME!r} application: "
                               "start `rlhi serve --config FILE` first")
        config = config.model_copy(update={"models": config.models.model_copy(
            update={"policy": trained_policy(config, policy)})})
        return redeploy(config, token)
    finally:
        ray.shutdown()


def close_chat_log() -> None:
    """Write the chat log's open batch now and say what it wrote and lost. (Serve's own
    shutdown would also flush it, but only into the replica's log.)"""
    from ray import serve

    from serve.app import APP_NAME

    try:
        counts = serve.get_deployment_handle("chat_log", APP_NAME).close.remote().result(
            timeout_s=120)
    except Exception as exc:  # noqa: BLE001 - shutting down regardless
        print(f"rlhi serve: the chat log did not confirm its last write ({type(exc).__name__}); "
              "its replica log says what it wrote", flush=True)
        return
    print(f"rlhi serve: chat log: {counts['written']} conversations written, "
          f"{counts['lost']} lost", flush=True)
