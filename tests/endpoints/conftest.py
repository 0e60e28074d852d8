"""One Serve application shared by every endpoint test (tests/endpoints/): Serve's fixed
start-up costs dominate on 2 cores, so it starts once for the package and is shut down at
its end, so later tests get the CPUs back. Its chat log is on, in a temporary folder, so
the chat tests are logged too (each log test reads its own conversation)."""
from __future__ import annotations

import pytest

from tests.conftest import free_port
from endpoints.endpoint_app import TOKEN, write_personas


@pytest.fixture(scope="package")
def server(ray_session, tiny_models, tmp_path_factory):
    """(base_url, config) of one running application, chat log on; Serve is shut down
    afterwards."""
    from ray import serve

    from pipelines.config import parse_config
    from serve.app import APP_NAME, build_app
    from serve.guard import token_digest

    run_dir = tmp_path_factory.mktemp("serve-run")
    write_personas(run_dir)
    lm = {"id": str(tiny_models.causal_lm), "engine": "transformers", "max_new_tokens": 8}
    app_cfg = {"num_cpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    config = parse_config({
        "run_dir": str(run_dir),
        "models": {"reward": lm, "rewriter": lm, "policy": lm},
        "serve": {"port": free_port(), "max_candidates": 4, "max_body_bytes": 20_000,
                  "max_tokens": 8, "request_timeout_s": 60,
                  "reward": {**app_cfg, "num_replicas": 2}, "rewrite": app_cfg,
                  "chat": {**app_cfg, "log": {
                      "enabled": True, "folder": str(tmp_path_factory.mktemp("chat-log")),
                      "max_batch_conversations": 64, "max_batch_seconds": 0.3}}}})
    serve.start(http_options={"host": "127.0.0.1", "port": config.serve.port})
    serve.run(build_app(config, token_digest(TOKEN)), name=APP_NAME, route_prefix="/")
    base = f"http://127.0.0.1:{config.serve.port}"
    from serve.client import RLHIClient

    RLHIClient(base, TOKEN).wait_healthy(timeout_s=60)
    yield base, config
    serve.shutdown()
