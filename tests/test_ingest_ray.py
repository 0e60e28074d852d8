"""The ingest stage on a real local Ray (one Ray for the whole test session)."""
from __future__ import annotations

import copy
import hashlib
import json
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import parse_config
from pipelines.stages.ingest.stage import run_ingest
from pipelines.schema import CONVERSATIONS, REJECTS
from pipelines.stages.ingest.sources import InputError
from pipelines.contract import read_manifest
from tests.conftest import WILDCHAT_SAMPLE
from tests.wildchat_rows import good_row, sample_schema, write_jsonl, write_wildchat


def ingest(run_dir: Path, inputs: list, **ingest_cfg) -> dict:
    cfg = parse_config({"run_dir": str(run_dir), "ingest": {"inputs": [str(p) for p in inputs], **ingest_cfg},
                        "resources": {"progress_bars": False}})
    return run_ingest(cfg, use_ray=True)


@pytest.fixture(scope="session")
def sample_run(pipeline_run):
    run_dir, summaries = pipeline_run
    return run_dir, summaries["ingest"]


def test_the_bundled_sample_gives_47_conversations_of_12_users(sample_run):
    _, summary = sample_run
    assert summary["rows_in"] == 50 and summary["kept"] == 47
    assert summary["rejected"] == {"role_order": 3} and summary["filtered"] == {}
    assert summary["users"] == 12


def test_the_tables_have_the_declared_schemas(sample_run):
    run_dir, _ = sample_run
    conversations = pq.read_table(run_dir / "ingest" / "conversations")
    rejects = pq.read_table(run_dir / "ingest" / "rejects")
    assert conversations.schema.equals(CONVERSATIONS) and rejects.schema.equals(REJECTS)
    assert conversations.num_rows == 47 and rejects.num_rows == 3
    assert len(set(conversations.column("conversation_id").to_pylist())) == 47


def test_the_manifest_records_inputs_config_and_counts(sample_run):
    run_dir, _ = sample_run
    manifest = read_manifest(run_dir, "ingest")
    assert manifest["inputs"][0]["path"].endswith("train-00000-of-00001.parquet")
    assert len(manifest["inputs"][0]["sha256"]) == 64
    assert manifest["counts"]["kept"] == 47 and manifest["config_hash"]
    assert json.loads((run_dir / "ingest" / "summary.json").read_text())["kept"] == 47


@pytest.fixture(scope="session")
def mixed_run(ray_session, tmp_path_factory):
    """One run over every kind of trouble at once: malformed rows, filtered rows, duplicates,
    a user over the cap, 4.8M-style rows, JSONL, and two unreadable files (skipped)."""
    folder = tmp_path_factory.mktemp("mixed-inputs")
    rows = []
    missing = good_row(0); missing["conversation"] = None; rows.append(missing)
    empty = good_row(1); empty["conversation"] = []; rows.append(empty)
    null_content = good_row(2); null_content["conversation"][0]["content"] = None; rows.append(null_content)
    order = good_row(3); order["conversation"] = order["conversation"][1:]; rows.append(order)
    no_language = good_row(4); no_language["language"] = None; rows.append(no_language)
    toxic = good_row(5); toxic["toxic"] = True; rows.append(toxic)
    french = good_row(6); french["language"] = "French"; rows.append(french)
    keep = good_row(7); rows.append(keep); rows.append(copy.deepcopy(keep))  # a duplicate
    for i in range(3):  # one user, three conversations, cap 2
        capped = good_row(8); capped["hashed_ip"] = "busy-user"
        capped["conversation"][0]["turn_identifier"] = 10_000 + i; rows.append(capped)
    write_wildchat(folder / "a.parquet", rows)
    # WildChat-4.8M style: no time zone, extra turn fields.
    turn = sample_schema().field("conversation").type.value_type
    turn_fields = [pa.field(f.name, pa.timestamp("us") if f.name == "timestamp" else f.type) for f in turn]
    turn_fields.append(pa.field("reasoning_content", pa.string()))
    schema = pa.schema([pa.field("conversation", pa.list_(pa.struct(turn_fields))) if f.name == "conversation"
                        else pa.field("timestamp", pa.timestamp("us")) if f.name == "timestamp" else f
                        for f in sample_schema()])
    new = good_row(9); new["timestamp"] = datetime(2025, 1, 1)
    for t in new["conversation"]:
        t["timestamp"], t["reasoning_content"] = datetime(2025, 1, 1), "..."
    write_wildchat(folder / "b-4.8m.parquet", [new], schema)
    write_jsonl(folder / "c.jsonl", [
        {"user_id": "j1", "timestamp": "2024-03-01T10:00:00Z", "language": "English",
         "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"user_id": "j1", "timestamp": "2024-03-01T10:00:00Z", "language": "English",
         "messages": [{"role": "user", "content": ["not", "a", "string"]}]},
        "{this is not json",
    ])
    good = (folder / "a.parquet").read_bytes()
    (folder / "d-truncated.parquet").write_bytes(good[: len(good) // 2])
    (folder / "e-not-parquet.parquet").write_text("just some text\n")
    run_dir = tmp_path_factory.mktemp("mixed-run")
    summary = ingest(run_dir, [folder], skip_bad_files=True, rows_per_task=4,
                     filters={"languages": ["English", "Chinese", "Russian"], "max_conversations_per_user": 2})
    return run_dir, summary


def test_every_input_row_is_kept_filtered_or_rejected_with_a_reason(mixed_run):
    _, s = mixed_run
    assert s["rows_in"] == 12 + 1 + 3
    assert s["rejected"] == {"missing_conversation": 1, "empty_conversation": 1, "null_content": 1,
                             "role_order": 1, "unknown_language": 1, "non_string_content": 1,
                             "invalid_json": 1}
    assert s["filtered"] == {"toxic": 1, "language": 1, "duplicate": 1, "user_cap": 1}
    assert s["kept"] == 5  # the kept row, the two under the cap, the 4.8M-style row, one JSONL row
    assert s["rows_in"] == s["kept"] + sum(s["filtered"].values()) + sum(s["rejected"].values())


def test_unreadable_files_are_listed_when_skipping(mixed_run):
    _, s = mixed_run
    bad = {Path(b["path"]).name: b["error"] for b in s["bad_files"]}
    assert set(bad) == {"d-truncated.parquet", "e-not-parquet.parquet"}
    assert all("cannot read as Parquet" in e for e in bad.values())


def test_rejects_point_back_to_their_source_rows(mixed_run):
    run_dir, _ = mixed_run
    rejects = pq.read_table(run_dir / "ingest" / "rejects").to_pylist()
    by_reason = {r["reason"]: r for r in rejects}
    assert Path(by_reason["missing_conversation"]["source_file"]).name == "a.parquet"
    assert by_reason["missing_conversation"]["source_index"] == 0
    assert by_reason["invalid_json"]["source_index"] == 2 and "line 3" in by_reason["invalid_json"]["detail"]
    # a hashed_ip that is not a hash is kept as its SHA-256 (pipelines/schema.py pseudonym)
    assert by_reason["user_cap"]["user_id"] == hashlib.sha256(b"busy-user").hexdigest()
    assert "busy-user" not in by_reason["user_cap"]["detail"]


def test_a_bad_file_fails_the_stage_naming_it(ray_session, tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(WILDCHAT_SAMPLE.read_bytes()[:5000])
    with pytest.raises(InputError, match="broken.parquet: cannot read as Parquet"):
        ingest(tmp_path / "run", [bad])
    assert not (tmp_path / "run" / "ingest").exists()


def test_a_parquet_file_in_another_schema_is_refused_naming_the_column(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["hello"]}), other)
    with pytest.raises(InputError, match="other.parquet: not in WildChat's schema: missing column 'conversation_hash'"):
        ingest(tmp_path / "run", [other])


@pytest.mark.parametrize("user_key,users", [("hashed_ip+user_agent", 12), ("hashed_ip+user_agent+accept_language", 12)])
def test_each_user_key_groups_the_sample(ray_session, tmp_path, user_key, users):
    summary = ingest(tmp_path, [WILDCHAT_SAMPLE], user_key=user_key)
    assert summary["kept"] == 47 and summary["users"] == users
    ids = pq.read_table(tmp_path / "ingest" / "conversations", columns=["user_id"]).column("user_id").to_pylist()
    assert all(len(u) == 40 for u in ids)
