"""`rlhi serve`: run the application in the foreground until SIGINT or SIGTERM.

Refuses to start without a token, starts (or joins) Ray, binds Serve's HTTP proxy to the
configured host and port, waits for /healthz, prints the URLs, and on a signal writes the
chat log's open batch (printing how many conversations it wrote and lost), shuts down
Serve and, if it started Ray itself, that Ray too.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

from pipelines.config import RunConfig
from serve.guard import read_token, token_digest

ENDPOINTS = ("POST /v1/score", "POST /v1/rewrite", "POST /v1/chat/completions",
             "GET /v1/models", "GET /healthz", "GET /docs")


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
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
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
