"""The ledger of a served_logs round (pipelines/stages/ingest/served.py), without Ray: each
round takes exactly the chat log rows that arrived since the rounds before it, nothing
twice and nothing skipped, across continued conversations, forgets, reused part numbers
and restarts. The log is written by the chat app's own writer (serve/chat_log.py).
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.stages.ingest.served import SNAPSHOT, ledger_path, take_new_rows
from serve.chat_log import ChatLogWriter, ChatTurn, part_paths
from pipelines.tools.forget import remove_from_chat_log

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def redactor():
    from pipelines.redact import Redactor

    return Redactor()


@pytest.fixture
def log(tmp_path, redactor):
    writer = ChatLogWriter(tmp_path / "log", redactor, max_batch_conversations=100, max_batch_seconds=3600)
    yield writer
    writer.close()


def say(log: ChatLogWriter, cid: str, *texts: str, user: str = "u1") -> None:
    """One turn of conversation `cid`: the user's messages so far (`texts`), answered."""
    messages = []
    for i, text in enumerate(texts):
        messages.append({"role": "user", "content": text})
        if i < len(texts) - 1:
            messages.append({"role": "assistant", "content": f"Answer {i}."})
    log.add(ChatTurn(cid, user, messages, f"Answer {len(texts) - 1}.", "policy-x", "v1",
                     T0 + timedelta(minutes=len(texts)), T0 + timedelta(minutes=len(texts), seconds=2)))


def commit(run_dir: Path, round_index: int, ledger: dict) -> None:
    """What the round's ingest does when it commits: its ledger lands in its stage output."""
    path = ledger_path(run_dir, round_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ledger))


def taken(ledger: dict) -> dict[str, dict[str, int]]:
    return {part["part"]: part["conversations"] for part in ledger["parts"]}


def snapshot_rows(run_dir: Path, round_index: int) -> list[tuple[str, int]]:
    folder = run_dir / f"round-{round_index}" / SNAPSHOT
    table = pq.read_table(sorted(folder.glob("*.parquet")))
    return sorted(zip(table.column("conversation_hash").to_pylist(),
                      [len(c) for c in table.column("conversation").to_pylist()]))


def test_each_round_takes_only_the_rows_that_arrived_since_the_round_before(tmp_path, log):
    run_dir = tmp_path / "run"
    say(log, "a", "Hi.")
    say(log, "b", "Hello.")
    log.flush()                                  # part 0
    say(log, "c", "Hey.")
    log.flush()                                  # part 1
    first = take_new_rows(log.folder, run_dir, 1)
    assert taken(first) == {"part-000000.parquet": {"a": 2, "b": 2}, "part-000001.parquet": {"c": 2}}
    assert first["rows"] == 3 and snapshot_rows(run_dir, 1) == [("a", 2), ("b", 2), ("c", 2)]
    commit(run_dir, 1, first)

    say(log, "d", "New one.")
    log.flush()                                  # part 2
    second = take_new_rows(log.folder, run_dir, 2)
    assert taken(second) == {"part-000002.parquet": {"d": 2}}
    assert snapshot_rows(run_dir, 2) == [("d", 2)]
    commit(run_dir, 2, second)
    third = take_new_rows(log.folder, run_dir, 3)
    assert third == {"folder": str(log.folder.resolve()), "rows": 0, "parts": []}
    assert snapshot_rows(run_dir, 3) == []       # an empty snapshot: the round ingests nothing


def test_a_conversation_that_continued_is_taken_again_with_its_new_turns(tmp_path, log):
    run_dir = tmp_path / "run"
    say(log, "a", "Hi.")
    say(log, "b", "Hello.")
    log.flush()
    commit(run_dir, 1, take_new_rows(log.folder, run_dir, 1))
    say(log, "a", "Hi.", "Shorter please.")       # a continues: its row moves to part 1
    log.flush()
    assert [pq.read_table(p).column("conversation_hash").to_pylist() for p in part_paths(log.folder)] == [
        ["b"], ["a"]]
    second = take_new_rows(log.folder, run_dir, 2)
    assert taken(second) == {"part-000001.parquet": {"a": 4}}
    assert snapshot_rows(run_dir, 2) == [("a", 4)]


def test_a_part_rewritten_by_forget_is_not_read_again_and_a_reused_part_number_is(tmp_path, log, redactor):
    run_dir = tmp_path / "run"
    say(log, "a", "Hi.", user="u1")
    say(log, "b", "Hello.", user="u2")
    log.flush()
    say(log, "c", "Hey.", user="u3")
    log.flush()
    commit(run_dir, 1, take_new_rows(log.folder, run_dir, 1))
    assert remove_from_chat_log(log.folder, "u1") == 1     # part 0 rewritten with b only
    assert remove_from_chat_log(log.folder, "u3") == 1     # part 1 emptied and deleted
    log.close()
    restarted = ChatLogWriter(log.folder, redactor, max_batch_conversations=100, max_batch_seconds=3600)
    say(restarted, "e", "Again.", user="u4")
    restarted.flush()                            # the number of the deleted part comes back
    restarted.close()
    assert [p.name for p in part_paths(log.folder)] == ["part-000000.parquet", "part-000001.parquet"]
    second = take_new_rows(log.folder, run_dir, 2)
    assert taken(second) == {"part-000001.parquet": {"e": 2}}


def test_a_round_that_crashed_before_committing_takes_the_same_rows_again(tmp_path, log):
    run_dir = tmp_path / "run"
    say(log, "a", "Hi.")
    log.flush()
    commit(run_dir, 1, take_new_rows(log.folder, run_dir, 1))
    say(log, "b", "Hello.")
    log.flush()
    take_new_rows(log.folder, run_dir, 2)          # round 2 reads, then dies before its ingest commits
    say(log, "c", "Hey.")
    log.flush()
    retried = take_new_rows(log.folder, run_dir, 2)
    assert taken(retried) == {"part-000001.parquet": {"b": 2}, "part-000002.parquet": {"c": 2}}
    assert snapshot_rows(run_dir, 2) == [("b", 2), ("c", 2)]   # the crashed attempt's copy replaced
    assert not list((run_dir / "round-2").glob(".served.tmp-*"))
    commit(run_dir, 2, retried)
    assert take_new_rows(log.folder, run_dir, 3)["parts"] == []


def test_a_missing_log_folder_says_what_to_point_at(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"online.logs: .*nowhere is not a folder.*serve.chat.log.folder"):
        take_new_rows(tmp_path / "nowhere", tmp_path / "run", 1)


def test_forget_removes_the_user_from_a_rounds_copy_of_the_log(tmp_path, log):
    from pipelines.tools.forget import forget_user

    run_dir = tmp_path / "run"
    say(log, "a", "Hi.", user="u1")
    say(log, "b", "Hello.", user="u2")
    log.flush()
    take_new_rows(log.folder, run_dir, 1)
    summary = forget_user(run_dir, "u1")
    assert summary["rows_removed"] == {"round-1/served": 1}
    assert snapshot_rows(run_dir, 1) == [("b", 2)]


def test_a_rebuilt_rounds_snapshot_loses_users_forgotten_before_and_forget_names_its_stage(tmp_path, log):
    from pipelines.tools.forget import LOG, forget_user, reapply_forgets

    run_dir = tmp_path / "run"
    say(log, "a", "Hi.", user="u1")
    log.flush()
    commit(run_dir, 1, take_new_rows(log.folder, run_dir, 1))
    summary = forget_user(run_dir, "u1")               # forgotten from the run, not from the log
    assert summary["rows_removed"] == {"round-1/served": 1}
    assert summary["stages_changed"] == ["round-1/ingest"]   # what a run in object storage republishes
    say(log, "b", "Hello again.", user="u1")         # the log still holds u1, who chats again
    say(log, "c", "Hey.", user="u2")
    log.flush()
    commit(run_dir, 2, take_new_rows(log.folder, run_dir, 2))   # round 2's ingest, just built
    assert snapshot_rows(run_dir, 2) == [("b", 2), ("c", 2)]
    assert (run_dir / LOG).is_file()
    assert reapply_forgets(run_dir, ledger_path(run_dir, 2).parent) == 1
    assert snapshot_rows(run_dir, 2) == [("c", 2)]


def test_a_rerun_of_a_committed_round_rereads_its_own_rows_not_later_rounds(tmp_path, log):
    from pipelines.stages.ingest.served import round_input

    def commit_stage(round_index: int, ledger: dict) -> None:   # the ingest stage, finished
        commit(run_dir, round_index, ledger)
        (ledger_path(run_dir, round_index).parent / "manifest.json").write_text("{}")

    run_dir = tmp_path / "run"
    say(log, "a", "Hi.")
    say(log, "b", "Hello.")
    log.flush()
    first = round_input(log.folder, run_dir, 1)
    commit_stage(1, first)
    say(log, "c", "Hey.")
    log.flush()
    commit_stage(2, round_input(log.folder, run_dir, 2))
    say(log, "d", "Late.")
    log.flush()
    # Round 1 reruns (a setting upstream changed): the rows it read then, from its snapshot.
    assert round_input(log.folder, run_dir, 1) == first
    assert snapshot_rows(run_dir, 1) == [("a", 2), ("b", 2)]
    assert taken(round_input(log.folder, run_dir, 3)) == {"part-000002.parquet": {"d": 2}}  # not committed: new rows
