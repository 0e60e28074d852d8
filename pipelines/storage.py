"""Run directories and inputs in object storage (`s3://`, `gs://`), through pyarrow's
filesystem layer.

A run whose `run_dir` is a URI works in a local working copy (`work_dir`; on a multi-node
cluster, storage every node sees) and the object store holds the run of record:
- when the run starts, every finished stage in the store that the working copy lacks (or
  holds at another version) is downloaded, so a run resumes on another machine;
- when a stage finishes, its folder is uploaded to a temporary prefix
  (`<run_dir>/.<stage>.tmp-<id>/`), then published: the old copy's manifest is deleted
  first, the files are copied into place, and `manifest.json` is copied last. A stage
  folder in the store is finished exactly when its manifest is there, as on disk; a crash
  mid-publish leaves a folder without a manifest, which no reader takes for finished;
- Ray Train keeps its checkpoints in the store directly (`train_storage`), so a restarted
  worker group resumes from there.
Inputs given as URIs are downloaded into the working copy before ingest reads them.

A location with a scheme this layer cannot open is an error naming it, never a local folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SCHEMES = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Run-level files and folders kept in the store beside the stages: the report, the forget
# log, the local MLflow store and its artifacts.
_RUN_ENTRIES = ("report", "forget.jsonl", "plan.json", "mlflow.db", "mlflow-artifacts")
# A stage's companion: a folder beside it in its round that it read and that belongs to it,
# published before its manifest and pulled with it. A served_logs round's ingest reads its
# snapshot of the chat log (`round-<k>/served/`, pipelines/stages/ingest/served.py), which
# its lineage names and `rlhi forget` rewrites.
_COMPANIONS = {"ingest": "served"}
_CHECKPOINTS = "storage/ray"   # Ray Train's checkpoints in a train stage's folder


class StorageError(ValueError):
    """A location that cannot be opened; the message names it and what to do."""


# The remote run of the step being run (set by the driver): the train stage keeps Ray Train's
# checkpoints in the store through it.
REMOTE_RUN: ContextVar["RemoteRun | None"] = ContextVar("rlhi_remote_run", default=None)


def scheme(location: str) -> str | None:
    """The URI scheme of a location ('s3'), or None for a local path."""
    match = _SCHEME.match(str(location))
    return match.group(1).lower() if match else None


def is_remote(location: str | Path) -> bool:
    return scheme(str(location)) not in (None, "file")


def check_location(location: str, what: str) -> str:
    """The location to use: a `file://` URI as its local path, others as they are. Refuses a
    scheme RLHI does not open (a typo must not become a local folder named 's3:')."""
    found = scheme(location)
    if found not in (None, "file", *SCHEMES):
        raise StorageError(f"{what} {location!r}: the scheme {found!r} is not supported; use a local "
                           f"path or one of {', '.join(s + '://' for s in SCHEMES)}")
    if found == "file":
        from urllib.parse import unquote, urlparse

        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{what} {location!r}: a file:// URI names a path on this machine "
                               f"(file:///path), not on host {parsed.netloc!r}")
        return unquote(parsed.path)
    return location


def open_uri(uri: str, what: str = "location") -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a URI; credentials and endpoint come from the
    usual environment (AWS_* variables, AWS_ENDPOINT_URL for an S3-compatible server,
    GOOGLE_APPLICATION_CREDENTIALS)."""
    import pyarrow.fs as pafs

    check_location(uri, what)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError with its own wording
        raise StorageError(f"{what} {uri!r}: cannot open it ({error})") from error


def default_work_dir(uri: str) -> Path:
    """~/.cache/rlhi/runs/<scheme>/<bucket>/<path>: the working copy of a remote run."""
    found = scheme(uri)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhi" / "runs"
    return root / found / uri[len(found) + 3:].strip("/")


def local_copy(location: str, work_dir: str | None = None) -> Path:
    """A local folder holding the run at `location`: the folder itself, or for a URI its
    working copy with the finished stages pulled from the store."""
    if not is_remote(location):
        return Path(location)
    remote = RemoteRun(location, work_dir)
    remote.pull()
    return remote.work_dir


def _same_object(local: Path, entry: Any) -> bool:
    """Whether a downloaded file is the store's object as it is now: the same size and, where
    the store gives one, the same modification time (an object re-uploaded with the same
    size, an edited label file, is downloaded again)."""
    if not local.is_file() or local.stat().st_size != entry.size:
        return False
    return entry.mtime is None or local.stat().st_mtime_ns == entry.mtime_ns


def download_inputs(inputs: list[str], work_dir: Path) -> list[str]:
    """Local paths for ingest's inputs: each URI (a file or a prefix) is downloaded into
    `<work_dir>/.inputs/<hash>/`, keeping its file names, and a file already there as the
    store holds it (`_same_object`) is not downloaded again; a file no longer under the
    prefix is removed from the copy. Local paths pass through."""
    import pyarrow.fs as pafs

    local = []
    for item in inputs:
        if not is_remote(item):
            local.append(item)
            continue
        filesystem, path = open_uri(item, "ingest input")
        target = work_dir / ".inputs" / hashlib.sha256(item.encode()).hexdigest()[:16]
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"ingest input {item!r}: no such object or prefix in the store")
        if info.type == pafs.FileType.File:
            files, base = [info], path.rsplit("/", 1)[0]
            local.append(str(target / info.base_name))
        else:
            files, base = filesystem.get_file_info(pafs.FileSelector(path, recursive=True)), path
            local.append(str(target))
            # A file gone from the store (withdrawn, renamed) goes from the copy too, or
            # ingest would read it from here on every later run.
            listed = {target / entry.path[len(base) + 1:] for entry in files if entry.type == pafs.FileType.File}
            for stale in [f for f in target.rglob("*") if f.is_file() and f not in listed] if target.is_dir() else []:
                stale.unlink()
        for entry in files:
            destination = target / entry.path[len(base) + 1:]
            if entry.type != pafs.FileType.File or _same_object(destination, entry):
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(entry.path, str(destination), source_filesystem=filesystem)
            if entry.mtime is not None:   # what `_same_object` compares the next time
                os.utime(destination, ns=(entry.mtime_ns, entry.mtime_ns))
    return local


@dataclass
class RemoteRun:
    """A run of record in object storage and its local working copy (`work_dir`; None: the
    default one, `default_work_dir`)."""

    uri: str
    work_dir: Path | str | None = None

    def __post_init__(self) -> None:
        self.uri = self.uri.rstrip("/")
        self.filesystem, self.root = open_uri(self.uri, "run_dir")
        self.work_dir = Path(self.work_dir) if self.work_dir else default_work_dir(self.uri)
        self._carried: list[tuple[str, str]] = []   # (store prefix, relative destination)

    def relative(self, local: Path) -> str:
        """A path of the working copy, relative to it (as the store names it)."""
        return Path(local).resolve().relative_to(self.work_dir.resolve()).as_posix()

    def names(self, path: str, folders_only: bool = False) -> list[str]:
        """The names directly under a folder of the store (empty if it does not exist)."""
        import pyarrow.fs as pafs

        return sorted(info.base_name for info in self._listing(path)
                      if not folders_only or info.type == pafs.FileType.Directory)

    def carry_on_publish(self, prefix: str, local_destination: Path) -> None:
        """Objects already in the store (Ray Train's checkpoints) that the next publication of
        the stage holding `local_destination` moves into that place, before its manifest."""
        self._carried.append((prefix, self.relative(local_destination)))

    def remote(self, relative: str | Path = "") -> str:
        return f"{self.root}/{Path(relative).as_posix()}".rstrip("/").removesuffix("/.")

    def train_storage(self, local: Path) -> tuple[str, Any]:
        """Ray Train's storage path and filesystem for a checkpoint folder of the working copy."""
        return self.remote(self.relative(local)), self.filesystem

    def finished_stages(self) -> dict[str, dict[str, Any]]:
        """Relative folder -> manifest, for every finished stage in the store."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        found = {}
        for info in self.filesystem.get_file_info(selector):
            relative = info.path[len(self.root) + 1:]
            if info.base_name != MANIFEST or any(part.startswith(".") for part in relative.split("/")):
                continue
            folder = relative.rsplit("/", 1)[0]
            if folder.count("/") > 1:   # a stage folder is <stage> or round-<k>/<stage>
                continue
            with self.filesystem.open_input_stream(info.path) as handle:
                found[folder] = json.loads(handle.read())
        return found

    def pull(self) -> list[str]:
        """Download the finished stages the working copy lacks or holds at another version,
        and the run-level files; returns the stage folders downloaded."""
        import pyarrow.fs as pafs

        self.work_dir.mkdir(parents=True, exist_ok=True)
        pulled = []
        for folder, manifest in sorted(self.finished_stages().items()):
            local = self.work_dir / folder
            mine = local / MANIFEST
            if mine.is_file() and json.loads(mine.read_text()) == manifest:
                continue
            companion = self._companion(folder)
            if companion and self.filesystem.get_file_info(self.remote(companion)).type == pafs.FileType.Directory:
                self._replace_local(companion)
            self._replace_local(folder)
            pulled.append(folder)
        for name in _RUN_ENTRIES:
            if self.filesystem.get_file_info(self.remote(name)).type != pafs.FileType.NotFound:
                pafs.copy_files(self.remote(name), str(self.work_dir / name), source_filesystem=self.filesystem)
        return pulled

    def publish(self, local_stage: Path) -> str:
        """Upload a finished stage folder of the working copy and publish it (manifest last);
        returns its URI."""
        import pyarrow.fs as pafs

        relative = self.relative(local_stage)
        parent, _, name = relative.rpartition("/")
        folder, final = self.remote(parent), self.remote(relative)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        for stale in self._listing(folder):
            if stale.type == pafs.FileType.Directory and stale.base_name.startswith(f".{name}.tmp-"):
                self.filesystem.delete_dir(stale.path)
        pafs.copy_files(str(local_stage), tmp, destination_filesystem=self.filesystem)
        self._delete_if_present(f"{final}/{MANIFEST}")
        carried = [(prefix, self.remote(dest)) for prefix, dest in self._carried if dest.startswith(relative + "/")]
        self._carried = [entry for entry in self._carried if not entry[1].startswith(relative + "/")]
        # The old files go, but not the store's checkpoints when nothing replaces them: the
        # working copy never holds them (`_download`), so a republish of a stage that did not
        # retrain (`rlhi forget`) must not delete them.
        keep = "" if carried or (local_stage / _CHECKPOINTS).exists() else f"{final}/{_CHECKPOINTS}/"
        for old in self._listing(final, recursive=True):
            if old.type == pafs.FileType.File and not (keep and old.path.startswith(keep)):
                self.filesystem.delete_file(old.path)
        moves = [(tmp, final)] + carried
        companion = self._companion(relative)
        if companion and (self.work_dir / companion).is_dir():   # uploaded like the stage, moved before its manifest
            companion_tmp = f"{tmp}.{Path(companion).name}"
            pafs.copy_files(str(self.work_dir / companion), companion_tmp, destination_filesystem=self.filesystem)
            if self.filesystem.get_file_info(self.remote(companion)).type == pafs.FileType.Directory:
                self.filesystem.delete_dir_contents(self.remote(companion))
            moves.append((companion_tmp, self.remote(companion)))
        for source, target in moves:   # the manifest last of all
            for info in self._listing(source, recursive=True):
                if info.type == pafs.FileType.File and info.path != f"{tmp}/{MANIFEST}":
                    self._copy(info.path, target + info.path[len(source):])
        self._copy(f"{tmp}/{MANIFEST}", f"{final}/{MANIFEST}")
        for source, _ in moves:
            self.filesystem.delete_dir(source)
        return f"{self.uri}/{relative}"

    def local_stages(self) -> list[Path]:
        """The finished stage folders of the working copy (round 0 and online rounds)."""
        return sorted(path.parent for pattern in (f"*/{MANIFEST}", f"round-*/*/{MANIFEST}")
                      for path in self.work_dir.glob(pattern) if not path.parent.name.startswith("."))

    def unpublished(self) -> list[Path]:
        """The finished stages of the working copy that the store does not hold as they are
        (a publication that failed or was killed after the stage committed locally)."""
        published = self.finished_stages()
        return [folder for folder in self.local_stages()
                if published.get(self.relative(folder)) != json.loads((folder / MANIFEST).read_text())]

    def publish_run_files(self) -> None:
        """Upload the run-level files the working copy holds (report, forget log, MLflow store)."""
        import pyarrow.fs as pafs

        for name in _RUN_ENTRIES:
            if (self.work_dir / name).exists():
                pafs.copy_files(str(self.work_dir / name), self.remote(name), destination_filesystem=self.filesystem)

    @staticmethod
    def _companion(stage_folder: str) -> str | None:
        """The companion folder of an online round's stage (`_COMPANIONS`), relative to the
        working copy, or None."""
        parent, _, name = stage_folder.rpartition("/")
        return f"{parent}/{_COMPANIONS[name]}" if parent and name in _COMPANIONS else None

    def _replace_local(self, relative: str) -> None:
        """Download a folder of the store over the working copy's (atomic per folder)."""
        import shutil

        local = self.work_dir / relative
        incoming = local.parent / f".{local.name}.pull-{uuid.uuid4().hex[:8]}"
        self._download(self.remote(relative), incoming)
        if local.exists():
            shutil.rmtree(local)
        os.replace(incoming, local)

    def _copy(self, source: str, target: str) -> None:
        self.filesystem.copy_file(source, target)   # server-side: no bytes pass through here

    def _download(self, folder: str, local: Path) -> None:
        """A stage folder of the store into a local folder, without Ray Train's checkpoints
        (`storage/ray`: a resumed or reread stage never needs them, and they are the bulk)."""
        import pyarrow.fs as pafs

        for info in self._listing(folder, recursive=True):
            relative = info.path[len(folder) + 1:]
            if info.type != pafs.FileType.File or relative.startswith(f"{_CHECKPOINTS}/"):
                continue
            (local / relative).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(info.path, str(local / relative), source_filesystem=self.filesystem)

    def _listing(self, path: str, recursive: bool = False) -> list[Any]:
        import pyarrow.fs as pafs

        return self.filesystem.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))

    def _delete_if_present(self, path: str) -> None:
        import pyarrow.fs as pafs

        if self.filesystem.get_file_info(path).type == pafs.FileType.File:
            self.filesystem.delete_file(path)
