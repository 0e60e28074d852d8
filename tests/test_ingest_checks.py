"""Ingest's per-row rules, as plain functions on records and Arrow tables (no Ray)."""
from __future__ import annotations

import copy
import hashlib
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.stages.ingest.checks import check_records, filter_reason, structure_error, user_id
from pipelines.config import Filters, IngestConfig
from pipelines.stages.ingest.sources import jsonl_records, wildchat_records
from tests.wildchat_rows import good_row, sample_rows, sample_schema


@pytest.fixture(scope="module")
def redactor():
    from pipelines.redact import Redactor

    return Redactor()


def records_of(rows, schema=None):
    table = pa.Table.from_pylist(rows, schema=schema or sample_schema())
    return list(wildchat_records(table, "input.parquet", 0))


def reason_of(row):
    return (structure_error(records_of([row])[0]) or (None,))[0]


def test_a_well_formed_row_passes_every_structure_rule():
    assert reason_of(good_row()) is None


def test_a_null_conversation_is_rejected_as_missing():
    row = good_row()
    row["conversation"] = None
    assert reason_of(row) == "missing_conversation"


def test_an_empty_conversation_is_rejected():
    row = good_row()
    row["conversation"] = []
    assert reason_of(row) == "empty_conversation"


def test_null_content_is_rejected():
    row = good_row()
    row["conversation"][1]["content"] = None
    assert reason_of(row) == "null_content"


def test_whitespace_only_content_is_rejected():
    row = good_row()
    row["conversation"][0]["content"] = " \n\t "
    assert reason_of(row) == "blank_content"


def test_an_opening_assistant_turn_is_a_role_order_failure():
    row = good_row()
    row["conversation"] = row["conversation"][1:]
    assert reason_of(row) == "role_order"


def test_two_assistant_turns_in_a_row_are_a_role_order_failure():
    row = good_row()
    row["conversation"].insert(1, copy.deepcopy(row["conversation"][1]))
    assert reason_of(row) == "role_order"


def test_an_unknown_role_is_rejected():
    row = good_row()
    row["conversation"][0]["role"] = "tool"
    assert reason_of(row) == "bad_role"


def test_a_null_language_is_rejected_as_unknown():
    row = good_row()
    row["language"] = None
    assert reason_of(row) == "unknown_language"


def test_a_row_without_hashed_ip_has_no_user():
    row = good_row()
    row["hashed_ip"] = None
    assert reason_of(row) == "missing_user"


def test_the_bundled_sample_has_three_role_order_failures():
    reasons = [structure_error(r) for r in records_of(sample_rows())]
    assert sum(1 for r in reasons if r and r[0] == "role_order") == 3
    assert sum(1 for r in reasons if r) == 3


def test_language_filter_keeps_only_listed_languages():
    record = records_of([good_row()])[0]
    assert filter_reason(record, Filters(languages=[record["language"]])) is None
    assert filter_reason(record, Filters(languages=["Klingon"]))[0] == "language"


def test_toxic_filter_sees_per_turn_flags_and_moderation():
    per_turn = good_row()
    per_turn["conversation"][1]["toxic"] = True
    moderated = good_row()
    moderated["openai_moderation"][0]["flagged"] = True
    for row in (per_turn, moderated):
        record = records_of([row])[0]
        assert filter_reason(record, Filters())[0] == "toxic"
        assert filter_reason(record, Filters(drop_toxic=False)) is None


def test_redacted_filter_is_off_by_default():
    row = good_row()
    row["redacted"] = True
    record = records_of([row])[0]
    assert filter_reason(record, Filters()) is None
    assert filter_reason(record, Filters(drop_redacted=True))[0] == "wildchat_redacted"


def test_min_user_turns_and_max_chars_filters():
    record = records_of([good_row()])[0]
    assert filter_reason(record, Filters(min_user_turns=99))[0] == "min_user_turns"
    assert filter_reason(record, Filters(max_chars=5))[0] == "too_long"


def test_user_keys_split_a_shared_ip_by_headers():
    a, b = good_row(0), good_row(0)
    b["header"]["user-agent"] = "another browser"
    ra, rb = records_of([a, b])
    assert user_id(ra, "hashed_ip") == user_id(rb, "hashed_ip") == a["hashed_ip"]
    assert user_id(ra, "hashed_ip+user_agent") != user_id(rb, "hashed_ip+user_agent")
    c = copy.deepcopy(a)
    c["header"]["accept-language"] = "fr-FR"
    rc = records_of([c])[0]
    assert user_id(ra, "hashed_ip+user_agent") == user_id(rc, "hashed_ip+user_agent")
    assert user_id(ra, "hashed_ip+user_agent+accept_language") != user_id(rc, "hashed_ip+user_agent+accept_language")


def test_identical_conversations_of_two_users_get_different_ids(redactor):
    a, b = good_row(0), good_row(0)
    b["hashed_ip"] = "another-user"
    result = check_records(records_of([a, b]), IngestConfig(), redactor)
    ids = result.conversations.column("conversation_id").to_pylist()
    assert result.conversations.num_rows == 2 and len(set(ids)) == 2


def test_wildchat_4_8m_rows_with_naive_timestamps_and_extra_turn_fields(redactor):
    """WildChat-4.8M: timestamps carry no time zone and turns carry extra fields."""
    base = sample_schema()
    turn = base.field("conversation").type.value_type
    turn_fields = [pa.field(f.name, pa.timestamp("us") if f.name == "timestamp" else f.type) for f in turn]
    turn_fields.append(pa.field("reasoning_content", pa.string()))
    fields = [pa.field("conversation", pa.list_(pa.struct(turn_fields))) if f.name == "conversation"
              else pa.field("timestamp", pa.timestamp("us")) if f.name == "timestamp" else f for f in base]
    row = good_row()
    row["timestamp"] = datetime(2024, 5, 1, 12, 30)
    for t in row["conversation"]:
        t["timestamp"] = datetime(2024, 5, 1, 12, 31)
        t["reasoning_content"] = "thinking..."
    result = check_records(records_of([row], pa.schema(fields)), IngestConfig(), redactor)
    assert result.conversations.num_rows == 1
    kept = result.conversations.to_pylist()[0]
    assert kept["timestamp"] == datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    assert kept["turns"][0]["timestamp"] == datetime(2024, 5, 1, 12, 31, tzinfo=timezone.utc)


def jsonl(*lines: bytes) -> list[dict]:
    return list(jsonl_records(b"\n".join(lines), "chats.jsonl", 0))


def test_jsonl_with_a_leading_system_message_is_kept(redactor):
    line = (b'{"user_id": "u1", "timestamp": "2024-01-02T03:04:05", "language": "English", "messages": '
            b'[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},'
            b' {"role": "assistant", "content": "Hello!"}]}')
    result = check_records(jsonl(line), IngestConfig(), redactor)
    kept = result.conversations.to_pylist()[0]
    assert kept["system"] == "Be brief." and [t["role"] for t in kept["turns"]] == ["user", "assistant"]
    assert kept["user_id"] == hashlib.sha256(b"u1").hexdigest() and kept["timestamp"].tzinfo is not None


def test_jsonl_malformed_lines_are_rejected_with_their_reason(redactor):
    lines = [
        b'{"user_id": "u1", "timestamp": 1700000000, "messages": [{"role": "user", "content": 42}]}',
        b'{"user_id": "u1", "timestamp": 1700000000, "messages": [{"role": "user"',
        b'[1, 2, 3]',
        b'{"user_id": "u1", "timestamp": "yesterday", "messages": [{"role": "user", "content": "hi"}]}',
        b'{"timestamp": 1700000000, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"user_id": "u1", "timestamp": 1700000000}',
        b'{"user_id": "u1", "timestamp": 1e20, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"user_id": "u1", "timestamp": NaN, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"user_id": "u1", "model": 5, "timestamp": 1700000000, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"user_id": "u1", "language": ["en"], "timestamp": 1, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"user_id": ' + b'[' * 100_000 + b']' * 100_000 + b'}',
        b'{"user_id": " ", "timestamp": 1700000000, "messages": [{"role": "user", "content": "hi"}]}',
    ]
    result = check_records(jsonl(*lines), IngestConfig(), redactor)   # none of them stops the stage
    assert result.rows_in == 12 and result.conversations.num_rows == 0
    reasons = result.rejects.column("reason").to_pylist()
    assert reasons == ["non_string_content", "invalid_json", "invalid_json", "bad_timestamp",
                       "missing_user", "missing_conversation", "bad_timestamp", "bad_timestamp",
                       "non_string_field", "non_string_field", "invalid_json", "missing_user"]
    assert result.rejects.column("source_index").to_pylist() == list(range(12))
    assert result.rejects.column("detail").to_pylist()[8] == "model is int, not a string"


def test_text_that_utf_8_cannot_hold_rejects_its_row_only(redactor):
    """A lone surrogate (an emoji cut in half by an export) in JSONL, or invalid UTF-8 bytes
    in a Parquet string: that row is rejected naming where, the others go on."""
    lines = [b'{"user_id": "u1", "timestamp": 1700000000, "messages": [{"role": "user", "content": "hi \\ud83d there"}]}',
             b'{"user_id": "u1", "timestamp": 1700000000, "messages": [{"role": "user", "content": "hi there"}]}']
    result = check_records(jsonl(*lines), IngestConfig(), redactor)
    assert result.conversations.num_rows == 1
    assert result.rejects.select(["source_index", "reason"]).to_pylist() == [{"source_index": 0, "reason": "invalid_text"}]
    assert result.rejects.column("detail")[0].as_py().startswith("turn 0: character 3 is a lone surrogate")

    table = pa.Table.from_pylist([good_row(), good_row(), good_row()], schema=sample_schema())
    language = pa.array([b"English", b"Eng\xfflish", b"English"], pa.binary()).view(pa.string())
    table = table.set_column(table.schema.get_field_index("language"), "language", language)
    result = check_records(list(wildchat_records(table, "input.parquet", 10)), IngestConfig(), redactor)
    assert result.rows_in == 3 and result.conversations.num_rows == 2
    assert result.rejects.select(["source_index", "reason"]).to_pylist() == [{"source_index": 11, "reason": "invalid_text"}]
    assert "row 11: a string is not valid UTF-8" in result.rejects.column("detail")[0].as_py()


def test_user_keys_that_are_not_hashes_are_hashed_so_no_table_carries_them(redactor):
    """A chat log's user_id or a served request's `user` may be an e-mail or a name: tables
    keep its SHA-256; WildChat's own 64-hex hashed_ip stays as it is."""
    line = (b'{"user_id": "alice.smith@example.com", "timestamp": 1700000000, '
            b'"messages": [{"role": "user", "content": "hi"}]}')
    kept = check_records(jsonl(line), IngestConfig(), redactor).conversations.to_pylist()[0]
    assert kept["user_id"] == hashlib.sha256(b"alice.smith@example.com").hexdigest()
    served = good_row()
    served["hashed_ip"] = "alice"
    for turn in served["conversation"]:
        turn["hashed_ip"] = "alice"
    wildchat = good_row()
    rows = check_records(records_of([served, wildchat]), IngestConfig(), redactor).conversations.to_pylist()
    assert rows[0]["user_id"] == rows[0]["hashed_ip"] == hashlib.sha256(b"alice").hexdigest()
    assert rows[1]["user_id"] == rows[1]["hashed_ip"] == wildchat["hashed_ip"] and len(wildchat["hashed_ip"]) == 64
    assert "alice" not in str(rows)


def test_identifiers_are_redacted_before_anything_downstream(redactor):
    row = good_row()
    row["conversation"][0]["content"] = "Mail me at jane.doe@example.org please"
    result = check_records(records_of([row]), IngestConfig(), redactor)
    text = result.conversations.to_pylist()[0]["turns"][0]["content"]
    assert "jane.doe@example.org" not in text
    assert result.redacted["email"] == 1
    assert result.conversations.column("redactions").to_pylist() == [1]


def decided_drops(tmp_path, parts: dict[int, list[tuple]], cap: int, buckets: int) -> tuple[dict, dict]:
    """Run drops.py's steps in-process on kept parts given as task -> [(conversation, user)]
    or [(conversation, user, day)] (the conversation's timestamp; without one, all share a
    day); returns {(task, row): (reason, detail)} and the histogram kept -> users."""
    from pipelines.stages.ingest import drops

    keys_dir, drops_dir = tmp_path / "keys", tmp_path / "drops"
    drops_dir.mkdir()
    for task, rows in parts.items():
        part = tmp_path / f"part-{task:06d}.parquet"
        days = [row[2] if len(row) > 2 else 1 for row in rows]
        pq.write_table(pa.table({"conversation_id": [row[0] for row in rows], "user_id": [row[1] for row in rows],
                                 "timestamp": pa.array([datetime(2024, 1, d, tzinfo=timezone.utc) for d in days],
                                                       pa.timestamp("us", tz="UTC"))}), part)
        drops.shard_keys(str(part), task, str(keys_dir), buckets)
    for bucket in sorted(keys_dir.glob("cid-*")):
        drops.find_duplicates(str(bucket), str(keys_dir), str(drops_dir), buckets)
    histogram = drops.merge_histograms([drops.apply_cap(str(b), str(drops_dir), cap)
                                        for b in sorted(keys_dir.glob("user-*"))])
    decided = {}
    for task in parts:
        table = drops.read_drops(drops_dir, task)
        low = drops.task_range(task)[0]
        decided.update({(task, order - low): (reason, detail) for order, reason, detail in
                        zip(*(table.column(c).to_pylist() for c in ("order", "reason", "detail")))})
    return decided, dict(histogram)


@pytest.mark.parametrize("buckets", [1, 3])
def test_duplicates_keep_the_first_in_input_order_then_the_cap_applies(tmp_path, buckets):
    # Input order: (0,0)=a (0,1)=b (1,0)=a again (1,1)=c (2,0)=d; task 1's part is written first
    parts = {1: [("a", "u"), ("c", "u")], 0: [("a", "u"), ("b", "u")], 2: [("d", "v")]}
    decided, histogram = decided_drops(tmp_path, parts, cap=2, buckets=buckets)
    assert decided == {(1, 0): ("duplicate", "conversation_id a was kept earlier in the input"),
                       (1, 1): ("user_cap", "user u already has 2 conversations")}
    assert histogram == {2: 1, 1: 1}          # u keeps 2 (a, b), v keeps 1


def test_the_cap_counts_each_users_conversations_in_input_order_across_parts(tmp_path):
    parts = {0: [(f"c{i}", "heavy") for i in range(5)] + [("x", "light")], 1: [(f"d{i}", "heavy") for i in range(3)]}
    decided, histogram = decided_drops(tmp_path, parts, cap=4, buckets=4)
    assert sorted(decided) == [(0, 4), (1, 0), (1, 1), (1, 2)]
    assert {reason for reason, _ in decided.values()} == {"user_cap"}
    assert histogram == {4: 1, 1: 1}


def test_the_cap_keeps_each_users_earliest_conversations_whatever_the_order_of_the_files(tmp_path):
    later, earlier = [(f"late{i}", "u", 20 + i) for i in range(3)], [(f"early{i}", "u", 1 + i) for i in range(3)]
    for first, second in ((later, earlier), (earlier, later)):
        (tmp_path / first[0][0]).mkdir()
        decided, _ = decided_drops(tmp_path / first[0][0], {0: first, 1: second}, cap=2, buckets=2)
        kept = [row[0] for task, rows in ((0, first), (1, second)) for i, row in enumerate(rows)
                if (task, i) not in decided]
        assert sorted(kept) == ["early0", "early1"]


def test_the_median_of_a_histogram_is_the_median_of_the_values():
    from collections import Counter
    from statistics import median

    from pipelines.stages.ingest.drops import histogram_median

    for values in ([1], [1, 2], [3, 1, 2], [5, 5, 1, 1], [1, 1, 1, 2, 9, 9]):
        assert histogram_median(Counter(values)) == median(values)

def test_moving_a_checked_part_into_place_can_be_retried(tmp_path):
    """Ray retries a task whose worker died: a finish_part that had moved its parts already
    must find its work done, not fail the stage."""
    from pipelines.stages.ingest.stage import finish_part

    for folder in ("work/kept", "work/rejects", "drops", "out/conversations", "out/rejects"):
        (tmp_path / folder).mkdir(parents=True)
    part = tmp_path / "work" / "kept" / "part-000000.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), part)
    pq.write_table(pa.table({"y": [3]}), tmp_path / "work" / "rejects" / "part-000000.parquet")
    for _ in range(2):
        finish_part(str(part), str(tmp_path / "drops"), str(tmp_path / "out"))
    assert pq.read_table(tmp_path / "out" / "conversations" / "part-000000.parquet").column("x").to_pylist() == [1, 2]
    assert pq.read_table(tmp_path / "out" / "rejects" / "part-000000.parquet").column("y").to_pylist() == [3]


def _ingest_file(path, redactor):
    from pipelines.stages.ingest.sources import plan_file, read_task_records
    records = [r for task in plan_file(path, "wildchat", 0, 1000) for r in read_task_records(task)]
    return check_records(records, IngestConfig(), redactor)


def _large(kind):
    """`kind` as a file re-saved by pyarrow or polars may hold it: large strings and lists,
    nanosecond timestamps."""
    if pa.types.is_string(kind):
        return pa.large_string()
    if pa.types.is_list(kind):
        return pa.large_list(kind.value_field.with_type(_large(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_large(f.type)) for f in kind])
    if pa.types.is_timestamp(kind):
        return pa.timestamp("ns", tz=kind.tz)
    return kind


def test_files_resaved_with_large_types_or_nanosecond_timestamps_read_as_the_hubs(tmp_path, redactor):
    import pyarrow.compute as pc

    hub = pa.Table.from_pylist([good_row(), good_row()], schema=sample_schema())
    resaved = hub.cast(pa.schema([f.with_type(_large(f.type)) for f in hub.schema]))
    stamps = resaved.column("timestamp")   # 789 ns more: digits a microsecond cannot hold
    more = pc.add(stamps.cast(pa.int64()), 789).cast(stamps.type)
    resaved = resaved.set_column(resaved.schema.get_field_index("timestamp"), "timestamp", more)
    pq.write_table(hub, tmp_path / "hub.parquet")
    pq.write_table(resaved, tmp_path / "resaved.parquet")
    expected, got = _ingest_file(tmp_path / "hub.parquet", redactor), _ingest_file(tmp_path / "resaved.parquet", redactor)
    assert got.rejects.num_rows == 0 and got.conversations.num_rows == 2
    assert (got.conversations.drop_columns(["source_file"]).to_pylist()
            == expected.conversations.drop_columns(["source_file"]).to_pylist())


def test_a_turn_field_of_the_wrong_type_is_found_before_any_work_starts(tmp_path):
    from pipelines.stages.ingest.sources import InputError, plan_file

    hub = pa.Table.from_pylist([good_row()], schema=sample_schema())
    turn = hub.schema.field("conversation").type.value_type
    strings = pa.struct([f.with_type(pa.string()) if f.name == "turn_identifier" else f for f in turn])
    table = hub.cast(pa.schema([f.with_type(pa.list_(strings)) if f.name == "conversation" else f for f in hub.schema]))
    pq.write_table(table, tmp_path / "ids-as-text.parquet")
    with pytest.raises(InputError, match="ids-as-text.parquet: not in WildChat's schema: turn field 'turn_identifier' has type string"):
        plan_file(tmp_path / "ids-as-text.parquet", "wildchat", 0, 1000)
