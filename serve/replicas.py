"""The model replicas behind the gateway: one Serve deployment per app, each wrapping a role.

The roles (actors/) are the same classes the Ray Data stages use; here they only get a
batching front (`serve.batch`) and run their blocking model call in a thread, so the
replica's event loop keeps collecting the next batch while the current one computes.

The reward replica's sequence-classifier backends tokenize each request as it arrives,
before it joins the batch queue, so a batch holds only the model call, and batches by
tokens as well as requests (`token_slots`); the scorer pads in length-sorted buckets.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from actors.batch import regroup
from actors.engines import SamplingParams
from actors.models import ModelSpec, resolve_model
from pipelines.schema import pseudonym

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
logger = logging.getLogger("rlhi.serve")


@dataclass(frozen=True)
class Encoded:
    """One score request, tokenized: a row per candidate, and the batch slots it takes."""

    rows: list[dict[str, list[int]]]
    slots: int


def token_slots(tokens: int, max_batch_tokens: int, max_batch_size: int) -> int:
    """Batch slots of a request of `tokens` tokens. A batch has `max_batch_size` slots of
    `max_batch_tokens / max_batch_size` tokens each, so it closes at whichever limit comes
    first; a request takes at least one slot and at most all (a longer one runs alone)."""
    per_slot = max_batch_tokens / max_batch_size
    return max(1, min(max_batch_size, math.ceil(tokens / per_slot)))


@serve.deployment(name="reward")
class RewardReplica:
    """`RewardModel` scoring, batched across concurrent requests."""

    def __init__(self, backend: str, model: dict[str, Any], max_batch_size: int,
                 batch_wait_timeout_s: float, max_batch_tokens: int = 16384) -> None:
        from actors.reward_model import RewardModel

        self.backend = backend
        self.model = RewardModel(backend, ModelSpec.model_validate(model))
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        for batched in (self._score_requests, self._score_encoded):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def ready(self) -> bool:
        return True

    async def score(self, request: tuple[str, list[dict], list[str]]) -> list[float]:
        """(persona, messages, candidates) -> one score per candidate."""
        if not self.model.encodes:  # the judge: prompts built here, per request, as below
            prompts = await asyncio.to_thread(self.model.judge_prompts, *request)
            return await self._score_requests(prompts)
        # Tokenized here, per request, while the current batch computes: the batch then
        # holds only the model call.
        rows = await asyncio.to_thread(self.model.encode, *request)
        tokens = sum(len(row["input_ids"]) for row in rows)
        return await self._score_encoded(
            Encoded(rows, token_slots(tokens, self.max_batch_tokens, self.max_batch_size)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_requests(self, requests: list[list[list[dict]]]) -> list[list[float]]:
        """Each request is its candidates' judge prompts; all go into one model call."""
        scores = await asyncio.to_thread(self.model.score_judge_prompts,
                                         [prompt for prompts in requests for prompt in prompts])
        return regroup(scores, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01,
                 batch_size_fn=lambda requests: sum(r.slots for r in requests))
    async def _score_encoded(self, requests: list[Encoded]) -> list[list[float]]:
        """Tokenized requests; all their rows go into one model call."""
        scores = await asyncio.to_thread(self.model.score_encoded,
                                         [row for r in requests for row in r.rows])
        return regroup(scores, [r.rows for r in requests])


@serve.deployment(name="rewrite")
class RewriteReplica:
    """`Rewriter`, batched across concurrent requests (greedy decoding batches cleanly)."""

    def __init__(self, model: dict[str, Any], max_tokens: int, max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        from actors.rewriter import Rewriter

        spec = ModelSpec.model_validate(model)
        self.rewriter = Rewriter(spec.model_copy(
            update={"max_new_tokens": min(spec.max_new_tokens, max_tokens)}))
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def ready(self) -> bool:
        return True

    async def rewrite(self, request: tuple[str, list[dict], str, str]) -> dict:
        """(persona, messages, answer, feedback) -> the rewrite. Its prompt is built here, per
        request, so one that cannot fit fails alone, not the batch it would have joined."""
        prompt = await asyncio.to_thread(self.rewriter.prompt, *request)
        out = await self._generate(prompt)
        return {"rewrite": out.text, "finish_reason": out.finish_reason,
                "context_truncated": out.context_truncated}

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _generate(self, prompts: list[Any]) -> list[Any]:
        return await asyncio.to_thread(self.rewriter.generate, prompts)


def serving_personas_round(run_dir: str | Path) -> tuple[int, str | None]:
    """(round, its personas manifest's run key) of the newest round of the run's latest
    plan that built personas; (0, None) when none did."""
    from pipelines.contract import read_manifest
    from pipelines.schema import planned_rounds

    found = [(k, m.get("run_key")) for k in (planned_rounds(run_dir) if Path(run_dir).is_dir() else [])
             if (m := read_manifest(run_dir, "personas", k)) is not None]
    return found[-1] if found else (0, None)


def load_serving_personas(run_dir: str | Path | None) -> dict[str, tuple[str, str]]:
    """user_id -> (persona_id, persona text) of the `serving` rows of a run's personas
    table (pipelines/schema.py PERSONAS), of the newest round that built personas (a
    served_logs round rebuilds them with the users' new history). A missing table means
    no personas."""
    if run_dir is None:
        return {}
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.schema import PERSONAS, table_path

    round_index, _ = serving_personas_round(run_dir)
    table_dir = table_path(run_dir, "personas", "personas", round_index)
    if not table_dir.is_dir():
        return {}

    table = pq.read_table(table_dir, schema=PERSONAS)
    table = table.filter(pc.equal(table.column("serving"), True))
    return {row["user_id"]: (row["persona_id"], row["persona"]) for row in table.to_pylist()}


def policy_version(spec: ModelSpec) -> tuple[str, int]:
    """(version, created) of a policy: the first 12 hex digits of the SHA-256 of its weight
    files (names and bytes, sorted; a retrained folder gets a new version), and the newest
    weight file's modification time. A model without local weights (a Hub id, an `openai`
    engine) is versioned by its id and revision, created now."""
    folder, files = _weight_files(spec)
    digest = hashlib.sha256()
    if not files:
        digest.update(f"{spec.id}@{spec.revision or ''}".encode())
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:12], weights_created(spec)


def weights_created(spec: ModelSpec) -> int:
    """When a policy's weights were made: the newest weight file's modification time (now
    for a model without local weights). Cheap: no file is read."""
    _, files = _weight_files(spec)
    return int(max(p.stat().st_mtime for p in files)) if files else int(time.time())


def weights_stamp(spec: ModelSpec) -> list[tuple[str, int, int]]:
    """Each local weight file's name, size and modification time (ns): what a deployment's
    version needs to see a model retrained into the same folder, without reading the
    weights. [] for a model without local weights."""
    folder, files = _weight_files(spec)
    return [(str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns)
            for path in files for stat in (path.stat(),)]


def _weight_files(spec: ModelSpec) -> tuple[Path | None, list[Path]]:
    folder = Path(resolve_model(spec.id)) if spec.engine != "openai" else None
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()) \
        if folder is not None and folder.is_dir() else []
    return folder, files


@serve.deployment(name="chat")
class ChatReplica:
    """Persona-guided inference: the policy answers with the user's serving persona."""

    def __init__(self, model: dict[str, Any], version: str, max_tokens: int,
                 run_dir: str | None, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.01) -> None:
        """`version`: `policy_version(model)`, computed once where the application is built
        (hashing the weights again in every replica would read them twice per deploy)."""
        from actors.policy_sampler import PolicySampler

        spec = ModelSpec.model_validate(model)
        self.model_id = spec.id
        self.policy_version, self.created = version, weights_created(spec)
        self.sampler = PolicySampler(spec.model_copy(update={"max_new_tokens": max_tokens}),
                                     n=1)
        self.personas = load_serving_personas(run_dir)
        self._generate.set_max_batch_size(max_batch_size)
        self._generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        # One engine call at a time: two concurrent generate() calls would only split the
        # same cores.
        self.lock = asyncio.Lock()

    async def ready(self) -> bool:
        return True

    async def info(self) -> dict[str, Any]:
        """The served policy: its id, version and when its weights were made."""
        return {"id": self.model_id, "policy_version": self.policy_version,
                "created": self.created}

    async def complete(self, user: str | None, messages: list[dict], max_tokens: int | None,
                       temperature: float | None, top_p: float | None,
                       seed: int | None) -> dict[str, Any]:
        """One completion; returns text, finish reason, token counts and the persona id."""
        # Serving personas are keyed by the id ingest made of the request's `user` (runs
        # ingested before keys were hashed: the key itself).
        persona_id, persona = (self.personas.get(pseudonym(user)) or self.personas.get(user, (None, None))
                               if user else (None, None))
        # Fitting a long conversation re-tokenizes it turn by turn (seconds): off the event
        # loop, so other requests, health checks and batching go on meanwhile.
        prompt = await asyncio.to_thread(self.sampler.prompt, persona, messages)
        base = self.sampler.params
        # No seed: a fresh sample each time, as OpenAI's API does ("regenerate" must change
        # the answer); a request's own seed makes it repeatable.
        params = SamplingParams(
            max_new_tokens=min(max_tokens or base.max_new_tokens, base.max_new_tokens),
            n=1, temperature=base.temperature if temperature is None else temperature,
            top_p=base.top_p if top_p is None else top_p, seed=seed)
        engine = self.sampler.engine
        if seed is None:
            completion = await self._generate((prompt.messages, params))
        else:   # a request's own seed gives its own text only when it is decoded alone
            async with self.lock:
                completion = (await asyncio.to_thread(engine.generate, [prompt.messages], params))[0][0]
        return {"text": completion.text, "finish_reason": completion.finish_reason,
                "prompt_tokens": prompt.tokens, "completion_tokens": completion.num_tokens,
                "persona_id": persona_id, "model": self.model_id, "created": int(time.time()),
                "policy_version": self.policy_version}


    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate(self, requests: list[tuple[list[dict], SamplingParams]]) -> list[Any]:
        """Concurrent requests with the same sampling settings decode in one engine call
        (left-padded batch); requests whose settings differ go in separate calls."""
        groups: dict[SamplingParams, list[int]] = {}
        for index, (_, params) in enumerate(requests):
            groups.setdefault(params, []).append(index)
        out: list[Any] = [None] * len(requests)
        for params, indexes in groups.items():
            async with self.lock:
                results = await asyncio.to_thread(self.sampler.engine.generate,
                                                  [requests[i][0] for i in indexes], params)
            for index, result in zip(indexes, results):
                out[index] = result[0]
        return out


FOLDER_WAIT_S = 60.0  # how long a new chat-log replica waits for the one it replaces


@serve.deployment(name="chat_log", num_replicas=1)
class ChatLogReplica:
    """Conversation capture (serve/chat_log.py): one replica owns the log folder, so parts
    are numbered and rows superseded by a single writer whatever the gateway's replicas."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from pipelines.config import ChatLogConfig
        from pipelines.redact import Redactor
        from serve.chat_log import ChatLogWriter

        config = ChatLogConfig.model_validate(settings)
        # A redeploy that replaces this deployment (its folder or RLHI's code changed) starts
        # the new replica while the old one still drains and closes (Serve's graceful
        # shutdown, 20 s by default): the new writer waits for the folder rather than failing.
        self.writer = ChatLogWriter(config.folder, Redactor(config.redact),
                                    max_batch_conversations=config.max_batch_conversations,
                                    max_batch_seconds=config.max_batch_seconds,
                                    language=config.language, wait_for_folder_s=FOLDER_WAIT_S)
        # Checks often enough that a batch is written close to max_batch_seconds.
        self.period_s = min(1.0, config.max_batch_seconds / 4)
        self.ticker: asyncio.Task | None = None
        self.wake: asyncio.Event | None = None

    async def ready(self) -> bool:
        return True

    async def record(self, turn: Any) -> None:
        """Take one finished turn (serve.chat_log.ChatTurn). Returns at once: a due batch
        is written by the flusher task, off the request's path."""
        if self.ticker is None:  # started here, on the replica's event loop
            self.wake = asyncio.Event()
            self.ticker = asyncio.get_running_loop().create_task(self._flusher())
        if self.writer.add(turn):
            self.wake.set()

    async def _flusher(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.period_s)
            except TimeoutError:
                pass
            self.wake.clear()
            if self.writer.due():
                await asyncio.to_thread(self.writer.flush)

    async def close(self) -> dict[str, int]:
        """Write the open batch and stop; {"written", "lost"} conversations (also logged)."""
        counts = await asyncio.to_thread(self.writer.close)
        logger.info("chat log %s: %d conversations written, %d lost", self.writer.folder,
                    counts["written"], counts["lost"])
        return counts

    def __del__(self) -> None:
        # Serve calls this on a graceful shutdown (serve.shutdown(), SIGTERM to `rlhi serve`).
        writer = getattr(self, "writer", None)
        if writer is not None:
            counts = writer.close()
            logger.info("chat log %s: %d conversations written, %d lost", writer.folder,
                        counts["written"], counts["lost"])
