"""Run directories and inputs in object storage (pipelines/storage.py), against a real
S3-compatible server on 127.0.0.1 (tests/conftest.py `s3_bucket`). No Ray."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.config import ConfigError, parse_config


def finished_stage(work_dir: Path, name: str, rows: int, marker: str) -> Path:
    folder = work_dir / name
    (folder / "table").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), folder / "table" / "part-000000.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stage": name, "marker": marker}))
    return folder


def store_files(remote: storage.RemoteRun) -> dict[str, int]:
    selector = pafs.FileSelector(remote.root, recursive=True, allow_not_found=True)
    return {info.path[len(remote.root) + 1:]: info.size for info in remote.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.File}


def test_a_published_stage_is_in_the_store_with_its_manifest_and_no_temporary_prefix(s3_bucket, tmp_path):
    remote = storage.RemoteRun(f"{s3_bucket}/publish", tmp_path / "work")
    folder = finished_stage(remote.work_dir, "pairs", rows=7, marker="first")
    assert remote.publish(folder) == f"{s3_bucket}/publish/pairs"
    files = store_files(remote)
    assert sorted(files) == ["pairs/manifest.json", "pairs/table/part-000000.parquet"]
    table = pq.read_table(f"{remote.root}/pairs/table", filesystem=remote.filesystem)
    assert table.column("x").to_pylist() == list(range(7))
    assert remote.finished_stages() == {"pairs": {"stage": "pairs", "marker": "first"}}


def test_republishing_replaces_the_old_files_and_a_crash_mid_publish_leaves_nothing_finished(
        s3_bucket, tmp_path, monkeypatch):
    remote = storage.RemoteRun(f"{s3_bucket}/crash", tmp_path / "work")
    folder = finished_stage(remote.work_dir, "rewrites", rows=3, marker="old")
    (folder / "table" / "part-000001.parquet").write_bytes((folder / "table" / "part-000000.parquet").read_bytes())
    remote.publish(folder)
    (folder / "table" / "part-000001.parquet").unlink()
    finished_stage(remote.work_dir, "rewrites", rows=5, marker="new")

    copies, real_copy = [], remote._copy

    class Interrupted(Exception):
        pass

    def copy_then_crash(source: str, target: str) -> None:   # the process dies after one file
        if copies:
            raise Interrupted()
        copies.append(target)
        real_copy(source, target)

    monkeypatch.setattr(remote, "_copy", copy_then_crash)
    with pytest.raises(Interrupted):
        remote.publish(folder)
    monkeypatch.setattr(remote, "_copy", real_copy)
    assert remote.finished_stages() == {}                    # no manifest: nothing looks finished
    assert copies == [f"{remote.root}/rewrites/table/part-000000.parquet"]
    assert remote.unpublished() == [folder]                  # what the driver publishes when it starts again

    remote.publish(folder)                                   # the rerun publishes and cleans up
    assert remote.unpublished() == []
    assert sorted(store_files(remote)) == ["rewrites/manifest.json", "rewrites/table/part-000000.parquet"]
    assert remote.finished_stages()["rewrites"]["marker"] == "new"


def test_republishing_a_stage_keeps_the_checkpoints_only_the_store_holds_unless_new_ones_replace_them(
        s3_bucket, tmp_path):
    remote = storage.RemoteRun(f"{s3_bucket}/keep", tmp_path / "work")
    train = finished_stage(remote.work_dir, "train", rows=2, marker="trained")
    with remote.filesystem.open_output_stream(f"{remote.root}/.ray-run/ray/checkpoint_000002/model.bin") as out:
        out.write(b"weights")                                # where Ray Train wrote them, in the store
    remote.carry_on_publish(f"{remote.root}/.ray-run/ray", train / "storage" / "ray")
    remote.publish(train)
    checkpoint = "train/storage/ray/checkpoint_000002/model.bin"
    assert checkpoint in store_files(remote)

    # `rlhi forget` rewrites the table and republishes the stage; the working copy has no checkpoints.
    finished_stage(remote.work_dir, "train", rows=1, marker="forgot one user")
    remote.publish(train)
    assert sorted(store_files(remote)) == ["train/manifest.json", checkpoint, "train/table/part-000000.parquet"]
    assert pq.read_table(f"{remote.root}/train/table", filesystem=remote.filesystem).num_rows == 1

    # A retrained stage brings its own checkpoints: the old ones go.
    with remote.filesystem.open_output_stream(f"{remote.root}/.ray-run2/ray/checkpoint_000001/model.bin") as out:
        out.write(b"new weights")
    remote.carry_on_publish(f"{remote.root}/.ray-run2/ray", train / "storage" / "ray")
    remote.publish(train)
    assert [f for f in store_files(remote) if "checkpoint" in f] == ["train/storage/ray/checkpoint_000001/model.bin"]


def test_a_fresh_working_copy_pulls_the_finished_stages_but_not_checkpoints_or_unfinished_ones(s3_bucket, tmp_path):
    first = storage.RemoteRun(f"{s3_bucket}/pull", tmp_path / "machine-a")
    ingest = finished_stage(first.work_dir, "ingest", rows=4, marker="a")
    train = finished_stage(first.work_dir / "round-1", "train", rows=2, marker="t")
    (train / "storage" / "ray" / "checkpoint_000001").mkdir(parents=True)
    (train / "storage" / "ray" / "checkpoint_000001" / "model.bin").write_bytes(b"x" * 100)
    (train / "storage" / "ledger").mkdir()
    (train / "storage" / "ledger" / "rank-0.jsonl").write_text("{}\n")
    first.publish(ingest)
    first.publish(train)
    with first.filesystem.open_output_stream(f"{first.root}/.pairs.tmp-dead/manifest.json") as handle:
        handle.write(b"{}")                                  # a crashed stage's leftovers
    (first.work_dir / "forget.jsonl").write_text('{"user": "u1"}\n')
    first.publish_run_files()

    second = storage.RemoteRun(f"{s3_bucket}/pull", tmp_path / "machine-b")
    assert second.pull() == ["ingest", "round-1/train"]
    assert pq.read_table(second.work_dir / "ingest" / "table").num_rows == 4
    assert (second.work_dir / "round-1" / "train" / "storage" / "ledger" / "rank-0.jsonl").read_text() == "{}\n"
    assert not (second.work_dir / "round-1" / "train" / "storage" / "ray").exists()
    assert not (second.work_dir / "pairs").exists()
    assert (second.work_dir / "forget.jsonl").read_text() == '{"user": "u1"}\n'
    assert second.pull() == []                               # already current


def test_a_served_rounds_snapshot_of_the_chat_log_is_published_before_its_ingest_and_pulled_with_it(
        s3_bucket, tmp_path, monkeypatch):
    first = storage.RemoteRun(f"{s3_bucket}/served", tmp_path / "machine-a")
    ingest = finished_stage(first.work_dir / "round-1", "ingest", rows=3, marker="r1")
    snapshot = first.work_dir / "round-1" / "served"
    snapshot.mkdir()
    pq.write_table(pa.table({"conversation_hash": ["c-1", "c-2"]}), snapshot / "part-000004.parquet")
    copies, real_copy = [], first._copy
    monkeypatch.setattr(first, "_copy", lambda source, target: (copies.append(target), real_copy(source, target)))
    first.publish(ingest)
    assert copies[-1] == f"{first.root}/round-1/ingest/manifest.json"          # the manifest last
    assert f"{first.root}/round-1/served/part-000004.parquet" in copies[:-1]
    assert sorted(store_files(first)) == ["round-1/ingest/manifest.json", "round-1/ingest/table/part-000000.parquet",
                                          "round-1/served/part-000004.parquet"]  # no temporary prefix left

    # `rlhi forget` rewrites the snapshot and republishes the stage: the store follows.
    pq.write_table(pa.table({"conversation_hash": ["c-2"]}), snapshot / "part-000004.parquet")
    first.publish(ingest)
    second = storage.RemoteRun(f"{s3_bucket}/served", tmp_path / "machine-b")
    assert second.pull() == ["round-1/ingest"]
    pulled = second.work_dir / "round-1" / "served" / "part-000004.parquet"
    assert pq.read_table(pulled).column("conversation_hash").to_pylist() == ["c-2"]
    # A round-0 stage named like a companion's owner has none.
    assert storage.RemoteRun._companion("ingest") is None


def test_inputs_given_as_uris_are_downloaded_keeping_their_names(s3_bucket, tmp_path, wildchat_sample):
    filesystem, root = storage.open_uri(f"{s3_bucket}/datasets")
    pafs.copy_files(str(wildchat_sample), f"{root}/wildchat/{wildchat_sample.name}", destination_filesystem=filesystem)
    local = storage.download_inputs([f"{s3_bucket}/datasets/wildchat", str(wildchat_sample)], tmp_path)
    assert local[1] == str(wildchat_sample)
    downloaded = Path(local[0]) / wildchat_sample.name
    assert downloaded.read_bytes() == wildchat_sample.read_bytes()
    modified = downloaded.stat().st_mtime_ns
    assert storage.download_inputs([f"{s3_bucket}/datasets/wildchat"], tmp_path) == local[:1]
    assert downloaded.stat().st_mtime_ns == modified                # present at the same size: not fetched again
    single = storage.download_inputs([f"{s3_bucket}/datasets/wildchat/{wildchat_sample.name}"], tmp_path)
    assert Path(single[0]).name == wildchat_sample.name and Path(single[0]).read_bytes() == wildchat_sample.read_bytes()
    with pytest.raises(storage.StorageError, match="s3://rlhi-runs/datasets/missing.parquet': no such object"):
        storage.download_inputs([f"{s3_bucket}/datasets/missing.parquet"], tmp_path)
    # a shard withdrawn from the store (data removal) or renamed is not read from the copy again
    filesystem.move(f"{root}/wildchat/{wildchat_sample.name}", f"{root}/wildchat/renamed.parquet")
    [again] = storage.download_inputs([f"{s3_bucket}/datasets/wildchat"], tmp_path)
    assert sorted(p.name for p in Path(again).rglob("*") if p.is_file()) == ["renamed.parquet"]


def test_an_input_reuploaded_with_the_same_size_is_downloaded_again(s3_bucket, tmp_path):
    import time

    filesystem, root = storage.open_uri(f"{s3_bucket}/labels")
    uri = f"{s3_bucket}/labels/followup_labels.jsonl"
    for label in ("feedback", "new_task"):        # an edited label: the same number of bytes
        with filesystem.open_output_stream(f"{root}/followup_labels.jsonl") as out:
            out.write(f'{{"label": "{label}"}}\n'.encode())
        [local] = storage.download_inputs([uri], tmp_path)
        assert Path(local).read_text() == f'{{"label": "{label}"}}\n'
        time.sleep(1.1)                            # S3 modification times are in whole seconds


@pytest.mark.parametrize("key, value", [("run_dir", "s4://bucket/run"), ("run_dir", "hdfs://namenode/run")])
def test_a_run_dir_with_a_scheme_rlhi_cannot_open_is_an_error_naming_it(key, value):
    with pytest.raises(ConfigError, match=f"run_dir = \"{value}\".*scheme '{value.split(':')[0]}' is not supported"):
        parse_config({key: value})
    with pytest.raises(ConfigError, match=f"ingest input '{value}': the scheme"):
        parse_config({"ingest": {"inputs": [value]}})


def test_the_default_working_copy_is_named_after_the_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert storage.default_work_dir("s3://bucket/runs/x/") == tmp_path / "rlhi" / "runs" / "s3" / "bucket" / "runs" / "x"


def test_the_run_commands_pull_a_remote_run_into_its_working_copy_and_refuse_an_empty_one(
        s3_bucket, tmp_path, monkeypatch):
    from pipelines.cli import existing_run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    writer = storage.RemoteRun(f"{s3_bucket}/commands", tmp_path / "writer")
    writer.publish(finished_stage(writer.work_dir, "personas", rows=2, marker="p"))
    local, remote = existing_run(f"{s3_bucket}/commands")
    assert local == storage.default_work_dir(f"{s3_bucket}/commands") and remote.uri == f"{s3_bucket}/commands"
    assert json.loads((local / "personas" / "manifest.json").read_text()) == {"stage": "personas", "marker": "p"}
    with pytest.raises(ValueError, match="s3://rlhi-runs/nothing-here: no finished stage in the store"):
        existing_run(f"{s3_bucket}/nothing-here")


def test_the_driver_runs_a_remote_run_in_its_working_copy_with_its_inputs_downloaded(s3_bucket, tmp_path, wildchat_sample):
    from pipelines.driver import working_copy

    filesystem, root = storage.open_uri(f"{s3_bucket}/driver-inputs/sample.parquet")
    pafs.copy_files(str(wildchat_sample), root, destination_filesystem=filesystem)
    config = parse_config({"run_dir": f"{s3_bucket}/driver-run", "work_dir": str(tmp_path / "work"),
                           "ingest": {"inputs": [f"{s3_bucket}/driver-inputs/sample.parquet"]}})
    local, remote = working_copy(config)
    assert local.run_dir == str(tmp_path / "work") and remote.uri == f"{s3_bucket}/driver-run"
    (downloaded,) = local.ingest.inputs
    assert Path(downloaded).parent.parent == tmp_path / "work" / ".inputs"
    assert Path(downloaded).read_bytes() == wildchat_sample.read_bytes()


def test_the_chat_app_reads_a_remote_runs_personas_from_its_pulled_working_copy(s3_bucket, tmp_path):
    writer = storage.RemoteRun(f"{s3_bucket}/serving", tmp_path / "writer")
    writer.publish(finished_stage(writer.work_dir, "personas", rows=3, marker="serving"))
    local = storage.local_copy(f"{s3_bucket}/serving", str(tmp_path / "server"))
    assert local == tmp_path / "server" and pq.read_table(local / "personas" / "table").num_rows == 3
    assert storage.local_copy("runs/local") == Path("runs/local")
    with pytest.raises(ConfigError, match="serve.run_dir 'gopher://x/run': the scheme 'gopher' is not supported"):
        parse_config({"serve": {"run_dir": "gopher://x/run"}})


def test_a_file_uri_is_read_as_its_local_path_never_as_a_folder_named_file(tmp_path, wildchat_sample):
    config = parse_config({"run_dir": f"file://{tmp_path}/run", "ingest": {"inputs": [f"file://{wildchat_sample}"]}})
    assert config.run_dir == f"{tmp_path}/run" and config.ingest.inputs == [str(wildchat_sample)]
    with pytest.raises(ConfigError, match="names a path on this machine"):
        parse_config({"run_dir": "file://otherhost/run"})
