"""The chat log's batch writer (serve/chat_log.py) and forgetting from it, without Ray.

Turns are the ones the gateway hands over; the Redactor is the project's own. A killed
writer is a real subprocess killed with SIGKILL.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serve.chat_log import SCHEMA, ChatLogWriter, ChatTurn, part_paths

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def redactor():
    from pipelines.redact import Redactor

    return Redactor()


def turn(cid: str, user: str | None = "u1", messages: list[dict] | None = None, reply: str = "Sure.",
         version: str = "v1", minute: int = 0) -> ChatTurn:
    messages = messages or [{"role": "user", "content": f"Hello from {cid}."}]
    return ChatTurn(cid, user, messages, reply, "policy-x", version,
                    T0 + timedelta(minutes=minute), T0 + timedelta(minutes=minute, seconds=2))


def rows(folder: Path) -> list[list[dict]]:
    """Each part's rows, in part order."""
    return [pq.read_table(p).to_pylist() for p in part_paths(folder)]


def writer(folder: Path, redactor, **kwargs) -> ChatLogWriter:
    return ChatLogWriter(folder, redactor, **{"max_batch_conversations": 100,
                                              "max_batch_seconds": 3600, **kwargs})


def test_parts_appear_in_batch_order_in_wildchat_schema(tmp_path, redactor, wildchat_sample):
    log = writer(tmp_path, redactor)
    for batch in (["a", "b"], ["c"], ["d", "e"]):
        for cid in batch:
            log.add(turn(cid))
        log.flush()
    assert [p.name for p in part_paths(tmp_path)] == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert [[r["conversation_hash"] for r in part] for part in rows(tmp_path)] == [["a", "b"], ["c"], ["d", "e"]]
    assert {pq.read_schema(p) for p in part_paths(tmp_path)} == {pq.read_schema(wildchat_sample)} == {SCHEMA}
    assert log.close() == {"written": 5, "lost": 0}


_KILLED_MID_WRITE = """
import os, resource, signal, sys
sys.path.insert(0, {repo!r})
from pipelines.redact import Redactor
from serve.chat_log import ChatLogWriter
from tests.test_chat_log import turn
log = ChatLogWriter({folder!r}, Redactor([]), max_batch_conversations=100, max_batch_seconds=3600)
log.add(turn("small")); log.flush()
for i in range(40):
    log.add(turn(f"big-{{i}}", reply=os.urandom(8000).hex()))  # 16 KB each that do not compress
# No file may now grow past 64 KiB: the kernel kills the process (SIGXFSZ, which Python
# ignores unless told) halfway through writing the next part, with no chance to clean up.
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
log.flush()
"""


def test_a_writer_killed_while_writing_a_part_never_shows_it_and_the_next_one_counts_the_loss(
        tmp_path, redactor):
    script = _KILLED_MID_WRITE.format(repo=str(REPO), folder=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-2000:]
    assert [p.name for p in part_paths(tmp_path)] == ["part-000000.parquet"]
    assert [[r["conversation_hash"] for r in part] for part in rows(tmp_path)] == [["small"]]
    assert (tmp_path / ".part-000001.parquet.tmp").stat().st_size == 1 << 16  # the partial write
    log = writer(tmp_path, redactor)
    assert log.recovered_lost == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".writer", "part-000000.parquet"]
    log.close()


def test_two_users_sending_the_same_conversation_id_keep_two_conversations(tmp_path, redactor):
    """Clients choose conversation ids (the README's example uses 'my-chat-1'): bob's turn
    must not replace alice's conversation, in the same batch, in a later one, or after a
    restart of the writer."""
    log = writer(tmp_path, redactor)
    log.add(turn("my-chat-1", user="alice", reply="Alice's answer."))
    log.add(turn("my-chat-1", user="bob", reply="Bob's answer."))
    log.flush()
    log.add(turn("my-chat-1", user="carol", reply="Carol's answer."))
    log.close()
    log = writer(tmp_path, redactor)
    log.add(turn("my-chat-1", user="dave", reply="Dave's answer."))
    log.add(turn("my-chat-1", user="alice", reply="Alice again.", minute=5,
                 messages=[{"role": "user", "content": "Hello from my-chat-1."},
                           {"role": "assistant", "content": "Alice's answer."},
                           {"role": "user", "content": "More?"}]))
    log.close()
    logged = {r["hashed_ip"]: r for part in rows(tmp_path) for r in part}
    assert sorted(logged) == ["alice", "bob", "carol", "dave"]
    assert logged["alice"]["conversation_hash"] == "my-chat-1"
    assert [t["content"] for t in logged["alice"]["conversation"]] == [
        "Hello from my-chat-1.", "Alice's answer.", "More?", "Alice again."]
    others = {logged[u]["conversation_hash"] for u in ("bob", "carol", "dave")}
    assert len(others) == 3 and all(cid.startswith("my-chat-1:") for cid in others)
    assert [t["content"] for t in logged["bob"]["conversation"]] == ["Hello from my-chat-1.", "Bob's answer."]


def test_a_user_scoped_conversation_stays_one_after_the_other_user_is_forgotten(tmp_path, redactor):
    from pipelines.tools.forget import remove_from_chat_log

    log = writer(tmp_path, redactor)
    log.add(turn("my-chat-1", user="alice"))
    log.add(turn("my-chat-1", user="bob", reply="Bob's answer."))
    log.close()
    assert remove_from_chat_log(tmp_path, "alice") == 1
    log = writer(tmp_path, redactor)      # a restart: who held the id is read from the parts
    log.add(turn("my-chat-1", user="bob", reply="More.", minute=5,
                 messages=[{"role": "user", "content": "Hello from my-chat-1."},
                           {"role": "assistant", "content": "Bob's answer."}, {"role": "user", "content": "And?"}]))
    log.close()
    [bob] = [r for part in rows(tmp_path) for r in part]
    assert bob["conversation_hash"].startswith("my-chat-1:") and len(bob["conversation"]) == 4


def test_a_batch_is_due_when_full_or_old(tmp_path, redactor):
    now = [0.0]
    log = writer(tmp_path, redactor, max_batch_conversations=2, max_batch_seconds=5,
                 clock=lambda: now[0])
    assert log.add(turn("a")) is False and log.add(turn("a", minute=1)) is False  # one conversation
    assert log.add(turn("b")) is True
    log.flush()
    log.add(turn("c"))
    now[0] = 4.9
    assert log.due() is False
    now[0] = 5.0
    assert log.due() is True


def test_the_open_batch_is_written_on_close_and_later_turns_are_counted_lost(tmp_path, redactor):
    log = writer(tmp_path, redactor)
    log.add(turn("a"))
    log.add(turn("b"))
    assert part_paths(tmp_path) == []
    assert log.close() == {"written": 2, "lost": 0}
    assert [len(part) for part in rows(tmp_path)] == [2]
    log.add(turn("c"))
    assert log.close() == {"written": 2, "lost": 1}


def test_logged_turns_are_redacted(tmp_path, redactor):
    log = writer(tmp_path, redactor)
    log.add(turn("a", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "I am bob@example.org, call +1 415 555 0132."}],
                 reply="Noted, bob@example.org."))
    log.close()
    [[row]] = rows(tmp_path)
    assert [(t["role"], t["content"], t["redacted"]) for t in row["conversation"]] == [
        ("user", "I am <REDACTED_EMAIL>, call <REDACTED_PHONE>.", True),
        ("assistant", "Noted, <REDACTED_EMAIL>.", True)]  # and the system message is not logged
    assert row["redacted"] is True


def test_a_continued_conversation_keeps_one_row_with_its_earlier_turns(tmp_path, redactor):
    log = writer(tmp_path, redactor)
    first = [{"role": "user", "content": "Name a fruit."}]
    log.add(turn("a", messages=first, reply="Apple.", version="v1", minute=0))
    log.add(turn("b"))
    log.flush()
    second = first + [{"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another?"}]
    log.add(turn("a", messages=second, reply="Pear.", version="v2", minute=3))
    log.flush()
    parts = rows(tmp_path)
    assert [[r["conversation_hash"] for r in part] for part in parts] == [["b"], ["a"]]
    turns = parts[1][0]["conversation"]
    assert [(t["role"], t["content"]) for t in turns] == [
        ("user", "Name a fruit."), ("assistant", "Apple."), ("user", "Another?"), ("assistant", "Pear.")]
    assert [t["timestamp"] for t in turns] == [T0, T0 + timedelta(seconds=2), T0 + timedelta(minutes=3),
                                               T0 + timedelta(minutes=3, seconds=2)]
    assert [(t["header"] or {}).get("user-agent") for t in turns] == [None, "v1", None, "v2"]
    assert [t["hashed_ip"] for t in turns] == ["u1", None, "u1", None]
    assert parts[1][0]["turn"] == 2 and parts[1][0]["timestamp"] == T0 + timedelta(minutes=3, seconds=2)
    log.add(turn("b", messages=[{"role": "user", "content": "Hello from b."}, {"role": "assistant", "content": "Sure."},
                                {"role": "user", "content": "Bye."}], minute=5))
    log.flush()  # b's older part is now empty, and goes
    assert [p.name for p in part_paths(tmp_path)] == ["part-000001.parquet", "part-000002.parquet"]


_KILLED_WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from pipelines.redact import Redactor
from serve.chat_log import ChatLogWriter
from tests.test_chat_log import turn
log = ChatLogWriter({folder!r}, Redactor([]), max_batch_conversations=100, max_batch_seconds=3600)
log.add(turn("a")); log.add(turn("b")); log.flush()
log.add(turn("c")); log.add(turn("d")); log.add(turn("d", minute=1)); log.add(turn("e"))
print("mid-batch", flush=True)
time.sleep(60)
"""


def test_a_writer_killed_mid_batch_loses_only_the_open_batch_and_the_next_one_counts_it(tmp_path, redactor):
    script = _KILLED_WRITER.format(repo=str(REPO), folder=str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "mid-batch"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert [[r["conversation_hash"] for r in part] for part in rows(tmp_path)] == [["a", "b"]]
    log = writer(tmp_path, redactor)
    assert log.recovered_lost == 3  # c, d and e
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".writer", "part-000000.parquet"]
    log.add(turn("f"))
    log.close()
    assert [p.name for p in part_paths(tmp_path)] == ["part-000000.parquet", "part-000001.parquet"]


def test_a_second_writer_on_the_same_folder_is_refused(tmp_path, redactor):
    first = writer(tmp_path, redactor)
    with pytest.raises(RuntimeError, match="in use by another writer"):
        writer(tmp_path, redactor)
    first.close()
    writer(tmp_path, redactor).close()  # free again once the first has closed


def test_a_replacing_writer_waits_for_the_one_still_closing(tmp_path, redactor):
    import threading

    old = writer(tmp_path, redactor)
    old.add(turn("a"))
    threading.Timer(0.5, old.close).start()     # the replaced replica drains, then closes
    new = ChatLogWriter(tmp_path, redactor, wait_for_folder_s=30)
    assert [[r["conversation_hash"] for r in part] for part in rows(tmp_path)] == [["a"]]  # its batch was written
    new.close()
    held = writer(tmp_path, redactor)
    with pytest.raises(RuntimeError, match=r"in use by another writer \(waited 0.3 s\)"):
        ChatLogWriter(tmp_path, redactor, wait_for_folder_s=0.3)
    held.close()


def test_ingest_reads_the_log_back_without_rejects(tmp_path, redactor):
    from pipelines.config import IngestConfig
    from pipelines.stages.ingest.checks import check_records
    from pipelines.stages.ingest.sources import wildchat_records

    log = writer(tmp_path, redactor)
    log.add(turn("a", user="u1"))
    log.add(turn("b", user="u2", messages=[{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."},
                                           {"role": "user", "content": "Again."}]))
    log.close()
    [path] = part_paths(tmp_path)
    result = check_records(wildchat_records(pq.read_table(path), str(path), 0), IngestConfig(), redactor)
    assert result.rejects.num_rows == 0
    # the request's `user` becomes the id ingest makes of it (its SHA-256: no table keeps it)
    assert [(r["user_id"], r["n_user_turns"]) for r in result.conversations.to_pylist()] == [
        (hashlib.sha256(b"u1").hexdigest(), 1), (hashlib.sha256(b"u2").hexdigest(), 2)]


def test_forget_removes_the_users_conversations_from_the_chat_log(tmp_path, redactor):
    from pipelines.tools.forget import chat_log_user_ids, forget_user

    folder = tmp_path / "chat-log"
    log = writer(folder, redactor)
    log.add(turn("a", user="alice"))
    log.add(turn("b", user="bob"))
    log.flush()
    log.add(turn("c", user="alice"))
    log.close()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = forget_user(run_dir, "alice", chat_log=folder)
    assert summary["chat_log_rows_removed"] == 2
    assert [[r["conversation_hash"] for r in part] for part in rows(folder)] == [["b"]]
    assert [p.name for p in part_paths(folder)] == ["part-000000.parquet"]  # emptied part-000001 went
    # Under a combined ingest.user_key the run's id for bob is a hash: it finds him too.
    hashed = sorted(chat_log_user_ids("bob") - {"bob"})[0]
    assert forget_user(run_dir, hashed, chat_log=folder)["chat_log_rows_removed"] == 1
    assert part_paths(folder) == []


def test_rlhi_forget_takes_the_chat_log_folder(tmp_path, redactor, capsys):
    from pipelines.cli import main

    folder = tmp_path / "chat-log"
    log = writer(folder, redactor)
    log.add(turn("a", user="alice"))
    log.close()
    (tmp_path / "run").mkdir()
    assert main(["forget", "--run-dir", str(tmp_path / "run"), "--user", "alice",
                 "--chat-log", str(folder)]) == 0
    assert f"chat log {folder}: 1 conversations" in capsys.readouterr().out
    assert part_paths(folder) == []
