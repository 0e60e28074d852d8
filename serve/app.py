"""The RLHI serving application: one FastAPI gateway on one port, model replicas behind it.

    POST /v1/score             reward app: one score per candidate (batched, serve.batch)
    POST /v1/rewrite           rewriter app: revise an answer with the user's feedback
    POST /v1/chat/completions  chat app: OpenAI-compatible (streamed with `stream: true`),
                               `user` picks the serving persona, `conversation_id` groups turns
    GET  /v1/models            the served policy and its version, in OpenAI's list format
    GET  /healthz              no token; 200 once every enabled app is running, else 503
    GET  /docs, /openapi.json  OpenAPI (open, as /healthz: a browser sends no token)

With `serve.chat.log.enabled` every finished chat turn also goes to the `chat_log`
deployment (serve/chat_log.py), which writes the conversations as WildChat Parquet parts.

`build_app(config, token_digest)` turns the run config's `serve` and `models` sections into
a Serve application; `app_builder(args)` is the same for a Serve config YAML
(serve/serve_config.yaml, `serve run` / `serve deploy`).
"""
# No `from __future__ import annotations`: FastAPI reads the route annotations, and the
# request models are closure variables of make_gateway that string annotations cannot reach.
import asyncio
import hashlib
import json
import logging
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.config import RunConfig, ServeAppConfig, load_config
from pipelines.contract import code_version
from pipelines.storage import local_copy
from serve.chat_rows import ChatTurn
from serve.guard import Guard, read_token, request_id_of, token_digest
from serve.replicas import (ChatLogReplica, ChatReplica, RewardReplica, RewriteReplica, policy_version,
                            serving_personas_round, weights_stamp)
from serve.schemas import (ChatChoice, ChatChunk, ChatMessageOut, ChatResponse, ChatUsage, Limits,
                           ModelCard, ModelList, RewriteResponse, ScoreResponse, build_schemas)
from pipelines.schema import pseudonym
from serve.streaming import DONE, chunk_events

APP_NAME = "rlhi"
LOG_TIMEOUT_S = 10.0
logger = logging.getLogger("rlhi.serve")


def make_fastapi(limits: Limits, digest: str, max_body_bytes: int) -> FastAPI:
    """The FastAPI app: routes are attached by the Gateway class below."""
    app = FastAPI(title="RLHI", version="1",
                  description="Reward scoring, rewriting and persona-guided chat. Every "
                              "path except /healthz, /docs and /openapi.json needs "
                              "`Authorization: Bearer <token>` (in /docs: Authorize).")

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, declaring the bearer token every route needs (the Guard checks
        it), so that /docs can send it."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Malformed JSON is a 400; a well-formed body with a bad field is a 422. The
        # offending input is never echoed back (it may be large or private).
        status = 400 if any(e.get("type") == "json_invalid" for e in errors) else 422
        detail = [{"field": ".".join(str(p) for p in e.get("loc", ())), "type": e.get("type"),
                   "msg": e.get("msg")} for e in errors]
        return JSONResponse({"error": "invalid request", "detail": detail,
                             "request_id": request_id_of(request.scope)}, status_code=status)

    @app.exception_handler(ReplicaFailure)
    async def replica_error(request: Request, exc: ReplicaFailure) -> JSONResponse:
        rid = request_id_of(request.scope)
        # The exception type and request id only: messages can quote the request.
        logger.error("request %s failed: %s", rid, exc.kind)
        return JSONResponse({"error": f"replica error ({exc.kind}); retry, or report the "
                                      "request id", "request_id": rid},
                            status_code=exc.status)

    @app.exception_handler(TooLongForModel)
    async def too_long(request: Request, exc: TooLongForModel) -> JSONResponse:
        return JSONResponse({"error": "the persona and the last user turn (with the reply's tokens) do not fit "
                                      "the model's context window; shorten the persona or the last message",
                             "request_id": request_id_of(request.scope)}, status_code=422)

    app.add_middleware(Guard, digest=digest, max_body_bytes=max_body_bytes)
    return app


class ReplicaFailure(Exception):
    """A model replica failed or timed out; answered as 5xx with the request id."""

    def __init__(self, status: int, kind: str) -> None:
        super().__init__(kind)
        self.status, self.kind = status, kind


class TooLongForModel(Exception):
    """The request's persona and last turn cannot fit the model's window: a 422."""


async def call_replica(response: Any, timeout_s: float) -> Any:
    """Await a deployment response, turning any failure into a `ReplicaFailure` (or, for a
    request the model's window cannot hold, `TooLongForModel`)."""
    from actors.prompts import PromptTooLong

    try:
        return await asyncio.wait_for(response, timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise ReplicaFailure(504, "timeout") from None
    except Exception as exc:  # noqa: BLE001 - every replica error must become a 4xx or 5xx
        if isinstance(exc, PromptTooLong) or isinstance(getattr(exc, "cause", None), PromptTooLong):
            raise TooLongForModel() from None
        raise ReplicaFailure(503 if _is_unavailable(exc) else 500, type(exc).__name__) from None


def _is_unavailable(exc: BaseException) -> bool:
    """A replica that died or is restarting: worth a retry (503), not a bug (500)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


def make_gateway(limits: Limits, digest: str, max_body_bytes: int, timeout_s: float):
    """The ingress deployment class bound to these limits."""
    app = make_fastapi(limits, digest, max_body_bytes)
    schemas = build_schemas(limits)
    ScoreRequest, RewriteRequest, ChatRequest = (schemas.ScoreRequest, schemas.RewriteRequest,
                                                 schemas.ChatRequest)

    @serve.deployment(name="gateway")
    @serve.ingress(app)
    class Gateway:
        """Auth, validation and routing; holds no model."""

        def __init__(self, reward: DeploymentHandle | None, rewrite: DeploymentHandle | None,
                     chat: DeploymentHandle | None, chat_log: DeploymentHandle | None,
                     reward_backend: str) -> None:
            self.apps = {"reward": reward, "rewrite": rewrite, "chat": chat}
            self.chat_log = chat_log
            self.reward_backend = reward_backend
            self.unrecorded = 0
            """Turns the chat log did not take (its replica down or too slow)."""

        def _app(self, name: str) -> DeploymentHandle:
            handle = self.apps[name]
            if handle is None:
                from fastapi import HTTPException

                raise HTTPException(404, f"the {name} app is not enabled in this server")
            return handle

        @app.get("/healthz", include_in_schema=False)
        async def healthz(self) -> JSONResponse:
            calls = [h.ready.remote() for h in (*self.apps.values(), self.chat_log) if h is not None]
            try:
                await asyncio.wait_for(asyncio.gather(*calls), timeout=2.0)
            except Exception:  # starting, restarting or failed: not ready, say no more
                return JSONResponse({"status": "unavailable"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.post("/v1/score", response_model=ScoreResponse)
        async def score(self, body: ScoreRequest) -> ScoreResponse:  # type: ignore[valid-type]
            """One score per candidate (higher is better), batched with concurrent requests."""
            messages = [m.model_dump() for m in body.messages]
            scores = await call_replica(
                self._app("reward").score.remote((body.persona, messages, body.candidates)),
                timeout_s)
            return ScoreResponse(scores=scores, backend=self.reward_backend)

        @app.post("/v1/rewrite", response_model=RewriteResponse)
        async def rewrite(self, body: RewriteRequest) -> RewriteResponse:  # type: ignore[valid-type]
            """Revise `answer` using the user's `feedback` (user-guided rewrite)."""
            messages = [m.model_dump() for m in body.messages]
            out = await call_replica(self._app("rewrite").rewrite.remote(
                (body.persona, messages, body.answer, body.feedback)), timeout_s)
            return RewriteResponse(**out)

        @app.post("/v1/chat/completions", response_model=ChatResponse,
                  responses={200: {"content": {"text/event-stream": {}},
                                   "description": "chat.completion, or with `stream: true` "
                                                  "chat.completion.chunk events"}})
        async def chat(self, body: ChatRequest, request: Request):  # type: ignore[valid-type]
            """OpenAI-compatible chat completion conditioned on the user's serving persona;
            `stream: true` answers with server-sent events (serve/streaming.py)."""
            requested_at = datetime.now(timezone.utc)
            messages = [m.model_dump() for m in body.messages]
            max_tokens = body.max_completion_tokens or body.max_tokens
            out = await call_replica(self._app("chat").complete.remote(
                body.user, messages, max_tokens, body.temperature, body.top_p, body.seed),
                timeout_s)
            conversation_id = body.conversation_id or f"conv-{uuid.uuid4().hex}"
            # The log keeps the id ingest makes of the key (`pseudonym`), never the key itself.
            turn = ChatTurn(conversation_id, body.user and pseudonym(body.user), messages, out["text"], out["model"],
                            out["policy_version"], requested_at, datetime.now(timezone.utc))
            usage = ChatUsage(prompt_tokens=out["prompt_tokens"],
                              completion_tokens=out["completion_tokens"],
                              total_tokens=out["prompt_tokens"] + out["completion_tokens"])
            shared = {"id": f"chatcmpl-{request_id_of(request.scope)}", "created": out["created"],
                      "model": body.model or out["model"], "persona_id": out["persona_id"],
                      "conversation_id": conversation_id, "policy_version": out["policy_version"]}
            if not body.stream:
                await self._record(turn)
                return ChatResponse(**shared, usage=usage, choices=[ChatChoice(
                    index=0, message=ChatMessageOut(content=out["text"]),
                    finish_reason=out["finish_reason"])])

            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = chunk_events(ChatChunk(**shared, choices=[]), out["text"],
                                  out["finish_reason"], usage if include_usage else None)

            async def stream():
                for event in events:
                    if event == DONE:
                        # The client has the whole answer: logged now, before the end
                        # marker, after which clients hang up (and this generator would be
                        # cancelled). A client that hangs up earlier leaves the turn unlogged.
                        await self._record(turn)
                    yield event

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        @app.get("/v1/models", response_model=ModelList)
        async def models(self) -> ModelList:
            """The served policy with its `policy_version` (none when chat is off)."""
            if self.apps["chat"] is None:
                return ModelList(data=[])
            info = await call_replica(self.apps["chat"].info.remote(), timeout_s)
            return ModelList(data=[ModelCard(id=info["id"], created=info["created"],
                                             policy_version=info["policy_version"])])

        async def _record(self, turn: ChatTurn) -> None:
            """Hand a finished turn to the chat log; a failure is counted, never answered."""
            if self.chat_log is None:
                return
            try:
                await asyncio.wait_for(self.chat_log.record.remote(turn), LOG_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - the user has their answer either way
                self.unrecorded += 1
                logger.error("chat log did not take a turn (%s); %d turns not recorded by "
                             "this gateway", type(exc).__name__, self.unrecorded)

    return Gateway


def _scaling(app: ServeAppConfig) -> dict[str, Any]:
    """Serve deployment options of one app from its config."""
    options: dict[str, Any] = {
        "max_ongoing_requests": max(app.max_ongoing_requests, app.max_batch_size),
        "ray_actor_options": {"num_cpus": app.num_cpus, "num_gpus": app.num_gpus}}
    if app.autoscaling is not None:
        options["autoscaling_config"] = app.autoscaling.model_dump()
    else:
        options["num_replicas"] = app.num_replicas
    return options


def _pinned(deployment, args: tuple, options: dict[str, Any], made_from: Any = None):
    """`deployment.options(**options).bind(*args)` with a version derived from what its
    replicas are made from (`made_from`, else `args`), the options and RLHI's code version.
    Serve gives a deployment without a version a random one on every `serve.run`, so a
    redeploy (serve/run.py) would restart every deployment, the chat log's writer too; with
    these versions it replaces only the deployments whose inputs changed. (`version` is a
    Serve-internal option since 2.x; Ray is pinned in requirements/cpu.lock.)"""
    blob = json.dumps([deployment.name, args if made_from is None else made_from, options, code_version()],
                      sort_keys=True, default=str)
    version = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return deployment.options(version=version, _internal=True, **options).bind(*args)


def build_app(config: RunConfig, digest: str):
    """The Serve application of `config.serve` with the models of `config.models`."""
    settings, models = config.serve, config.models
    limits = Limits(max_candidates=settings.max_candidates, max_messages=settings.max_messages,
                    max_chars=settings.max_chars, max_tokens=settings.max_tokens)
    reward = rewrite = chat = None
    # A reward or rewrite model retrained into the same folder (the reward_model stage, a
    # rerun) changes its weight files' stamps, so the redeploy replaces that deployment too.
    if settings.reward.enabled:
        args = (settings.reward.backend, models.reward.model_dump(), settings.reward.max_batch_size,
                settings.reward.batch_wait_timeout_s, settings.reward.max_batch_tokens)
        reward = _pinned(RewardReplica, args, _scaling(settings.reward), made_from=[args, weights_stamp(models.reward)])
    if settings.rewrite.enabled:
        args = (models.rewriter.model_dump(), settings.max_tokens, settings.rewrite.max_batch_size,
                settings.rewrite.batch_wait_timeout_s)
        rewrite = _pinned(RewriteReplica, args, _scaling(settings.rewrite),
                          made_from=[args, weights_stamp(models.rewriter)])
    chat_log = None
    if settings.chat.enabled:
        # A run in object storage is pulled first: the replicas read its personas from disk.
        run_dir = local_copy(settings.run_dir or config.run_dir, config.work_dir)
        # What the replica is made from includes the policy's weights (their version is an
        # argument) and the personas it loads: weights retrained into the same folder or a new
        # round's personas restart it.
        args = (models.policy.model_dump(), policy_version(models.policy)[0], settings.max_tokens,
                str(run_dir.resolve()), settings.chat.max_batch_size, settings.chat.batch_wait_timeout_s)
        chat = _pinned(ChatReplica, args, _scaling(settings.chat), made_from=[args, serving_personas_round(run_dir)])
        log = settings.chat.log
        if log.enabled:
            # The folder is resolved here, where `rlhi serve` starts, not in a Ray worker.
            chat_log = _pinned(ChatLogReplica, (
                log.model_copy(update={"folder": str(Path(log.folder).resolve())}).model_dump(),),
                {"ray_actor_options": {"num_cpus": 0}})
    gateway = make_gateway(limits, digest, settings.max_body_bytes, settings.request_timeout_s)
    # The gateway only routes (by deployment name, so a replaced deployment is found again):
    # no CPU reserved, and enough slots for every client at once.
    made_from = [asdict(limits), digest,
                 settings.max_body_bytes, settings.request_timeout_s, settings.reward.backend,
                 [app is not None for app in (reward, rewrite, chat, chat_log)]]
    return _pinned(gateway, (reward, rewrite, chat, chat_log, settings.reward.backend),
                   {"num_replicas": settings.ingress_replicas, "max_ongoing_requests": 1024,
                    "ray_actor_options": {"num_cpus": 0}}, made_from=made_from)


def app_builder(args: dict[str, Any]):
    """Serve config YAML entry point (`import_path: serve.app:app_builder`).

    args: `config` (run config YAML, default configs/default.yaml). The token is read where
    the application is built, from `$RLHI_API_TOKEN` or `serve.token_file`.
    """
    config = load_config(args.get("config", "configs/default.yaml"))
    return build_app(config, token_digest(read_token(config.serve.token_file)))
