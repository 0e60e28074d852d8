"""`forget_user` removes one user's rows from every table and lists the weights it cannot untrain.

The run directory is built by hand (tables in the project schemas, manifests from
StageWriter): three users, alice and bob in the train split, eve in eval; two rounds.
Round 0's pairs hold bob (train) and eve (eval); round 1's pairs hold alice and bob (train).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.tools.forget import LOG, forget_user, remove_rows
from pipelines.schema import TABLES, check_schema
from pipelines.contract import StageWriter, read_manifest

USERS = {"alice": "train", "bob": "train", "eve": "eval"}
LABELS = {"alice": "correction", "bob": "complaint", "eve": "reattempt_feedback"}
PROMPT = [{"role": "user", "content": "hi"}]


def write_stage(folder: Path, stage: str, tables: dict[str, list[dict]], summary: dict,
                files: tuple[str, ...] = ()) -> None:
    """One finished stage: its tables in the schemas of pipelines/schema.py, extra files, manifest."""
    with StageWriter(folder, stage) as writer:
        for name, rows in tables.items():
            (writer.tmp / name).mkdir()
            pq.write_table(pa.Table.from_pylist(rows, schema=TABLES[name]), writer.tmp / name / "part-0.parquet")
        for extra in files:
            (writer.tmp / extra).parent.mkdir(parents=True, exist_ok=True)
            (writer.tmp / extra).write_text("weights")
        (writer.tmp / "summary.json").write_text(json.dumps(summary))
        writer.commit(config_hash=f"hash-{stage}", inputs=[], counts=summary, seed=7)


def train_stage(folder: Path, round_index: int) -> None:
    metrics = [{"step": s, "loss": 0.69 - 0.05 * s, "rewards/accuracies": 0.4 + 0.1 * s,
                "rewards/margins": 0.1 * s, "logps/chosen": -20.0, "samples_per_second": 3.0}
               for s in range(1, 6)]
    metrics.append({"step": 5, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75})
    summary = {"round": round_index, "train_pairs": 2, "eval_pairs": 1, "steps": 5, "final_loss": 0.44,
               "last_step_reward_accuracy": 0.8, "eval_reward_accuracy": 0.75, "eval_loss": 0.6}
    write_stage(folder, "train", {}, summary,
                files=("model/model.safetensors", "storage/ray/checkpoint_000000/model.safetensors",
                       "storage/ray/checkpoint_000001/model.safetensors"))
    (folder / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def pair(user: str, source: str, round_index: int) -> dict:
    return {"pair_id": f"{user}-{source}-{round_index}", "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}], "user_id": user,
            "split": USERS[user], "source": source, "margin": 0.3, "round": round_index,
            "followup_id": f"f-{user}" if source == "rewrite" else None,
            "sample_id": f"s-{user}" if source == "reward" else None}


def build_run(run_dir: Path) -> Path:
    """A two-round run dir with every stage the report and forget know about."""
    users = list(USERS)
    write_stage(run_dir, "ingest", {
        "conversations": [{"conversation_id": f"c-{u}-{i}", "user_id": u, "n_user_turns": 2}
                          for u in users for i in range(2)],
        "rejects": [{"user_id": "alice", "status": "rejected", "reason": "role_order"},
                    {"user_id": None, "status": "filtered", "reason": "language"}],
    }, {"rows_in": 8, "kept": 6, "filtered": {"language": 1}, "rejected": {"role_order": 1},
        "users": 3, "redacted": {}})
    write_stage(run_dir, "followups", {"followups": [
        *({"followup_id": f"f-{u}", "user_id": u, "label": LABELS[u]} for u in users),
        {"followup_id": "f-alice-2", "user_id": "alice", "label": "new_request"}]},
        {"followups": 4, "unclassified": 0})
    write_stage(run_dir, "personas", {
        "personas": [{"persona_id": f"p-{u}", "user_id": u, "persona": "likes tea"} for u in users],
        "users": [{"user_id": u, "split": split, "conversations": 2, "has_history": True}
                  for u, split in USERS.items()]}, {"users": 3, "snapshots": 3})
    write_stage(run_dir, "rewrites", {"rewrites": [
        {"followup_id": "f-alice", "user_id": "alice", "label": "correction", "status": "kept", "round": 0},
        {"followup_id": "f-bob", "user_id": "bob", "label": "complaint", "status": "filtered",
         "reason": "judge_prefers_original", "round": 0},
        {"followup_id": "f-eve", "user_id": "eve", "label": "reattempt_feedback", "status": "kept", "round": 0}]},
        {"followups_in": 3, "kept": 2})
    write_stage(run_dir, "reward_model", {}, {"train_pairs": 1, "eval_pairs": 1, "steps": 3,
                                              "accuracy_before": {"train": 0.5, "eval": 0.5},
                                              "accuracy_after": {"train": 1.0, "eval": 1.0}},
                files=("model/model.safetensors",))
    for k, folder, pair_users in ((0, run_dir, ("bob", "eve")), (1, run_dir / "round-1", ("alice", "bob"))):
        write_stage(folder, "rewards", {"samples": [
            {"sample_id": f"s-{u}", "user_id": u, "round": k, "status": "kept"} for u in pair_users] + [
            {"sample_id": "s-low", "user_id": "alice", "round": k, "status": "filtered", "reason": "below_threshold"}]},
            {"sampled": 3, "kept": 2})
        write_stage(folder, "pairs", {"pairs": [pair(u, s, k) for u in pair_users for s in ("rewrite", "reward")]},
                    {"pairs": 4})
        train_stage(folder, k)
    return run_dir


def user_counts(run_dir: Path) -> dict[str, dict[str, int]]:
    """Rows per user in every user table of the run."""
    counts = {}
    for path in sorted(run_dir.rglob("part-0.parquet")):
        if "user_id" in pq.read_schema(path).names:
            ids = pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist()
            counts[str(path.parent.relative_to(run_dir))] = {u: ids.count(u) for u in set(ids)}
    return counts


def test_forget_removes_the_user_from_every_table_and_only_that_user(tmp_path):
    run_dir = build_run(tmp_path / "run")
    before = user_counts(run_dir)
    summary = forget_user(run_dir, "alice")
    after = user_counts(run_dir)
    assert all("alice" not in users for users in after.values())
    assert after == {table: {u: n for u, n in users.items() if u != "alice"} for table, users in before.items()}
    expected = {table: users["alice"] for table, users in before.items() if "alice" in users}
    assert summary["rows_removed"] == expected
    assert set(expected) >= {"ingest/conversations", "ingest/rejects", "followups/followups",
                             "personas/personas", "personas/users", "rewrites/rewrites",
                             "rewards/samples", "round-1/rewards/samples", "round-1/pairs/pairs"}


def test_forget_keeps_every_schema_exactly(tmp_path):
    run_dir = build_run(tmp_path / "run")
    forget_user(run_dir, "alice")
    for path in run_dir.rglob("part-0.parquet"):
        name = path.parent.name
        check_schema(pq.read_table(path), TABLES[name], name)


def test_forget_lists_the_checkpoints_whose_train_pairs_had_the_user(tmp_path):
    run_dir = build_run(tmp_path / "run")
    summary = forget_user(run_dir, "alice")
    trained = {entry["stage"]: entry["paths"] for entry in summary["checkpoints_trained_on_user"]}
    round_1 = str(run_dir / "round-1" / "train")
    assert set(trained) == {round_1, str(run_dir / "reward_model")}  # not round 0's train
    assert trained[round_1] == [f"{round_1}/model", f"{round_1}/storage/ray/checkpoint_000000",
                                f"{round_1}/storage/ray/checkpoint_000001"]
    assert "untrained" in summary["note"]


def test_forget_lists_every_round_whose_train_pairs_had_the_user(tmp_path):
    run_dir = build_run(tmp_path / "run")
    summary = forget_user(run_dir, "bob")  # bob's only rewrite was filtered: no reward model
    assert [e["stage"] for e in summary["checkpoints_trained_on_user"]] == [
        str(run_dir / "train"), str(run_dir / "round-1" / "train")]
    assert summary["derived_checkpoints"] == []


def test_forget_lists_later_rounds_as_derived_from_a_trained_policy(tmp_path):
    run_dir = build_run(tmp_path / "run")
    remove_rows(run_dir / "round-1" / "pairs" / "pairs" / "part-0.parquet", "bob")
    summary = forget_user(run_dir, "bob")
    assert [e["stage"] for e in summary["checkpoints_trained_on_user"]] == [str(run_dir / "train")]
    assert [e["stage"] for e in summary["derived_checkpoints"]] == [str(run_dir / "round-1" / "train")]


def test_forget_of_an_eval_user_lists_no_checkpoint(tmp_path):
    run_dir = build_run(tmp_path / "run")
    summary = forget_user(run_dir, "eve")
    assert summary["total_rows_removed"] > 0
    assert summary["checkpoints_trained_on_user"] == []  # eval pairs and rewrites train nothing


def test_forget_marks_the_touched_stage_manifests(tmp_path):
    run_dir = build_run(tmp_path / "run")
    forget_user(run_dir, "alice")
    forget_user(run_dir, "bob")
    assert read_manifest(run_dir, "ingest")["forgotten_users"] == 2
    assert read_manifest(run_dir / "round-1", "pairs")["forgotten_users"] == 2
    assert read_manifest(run_dir, "pairs")["forgotten_users"] == 1  # alice had no round-0 pairs
    assert "forgotten_users" not in read_manifest(run_dir, "train")


def test_forget_of_an_unknown_user_removes_nothing_and_says_so(tmp_path):
    run_dir = build_run(tmp_path / "run")
    before = user_counts(run_dir)
    summary = forget_user(run_dir, "nobody")
    assert user_counts(run_dir) == before
    assert summary["rows_removed"] == {} and summary["total_rows_removed"] == 0
    assert summary["checkpoints_trained_on_user"] == []
    assert "nothing was removed" in summary["note"]
    assert "forgotten_users" not in read_manifest(run_dir, "ingest")


def test_forget_appends_a_record_per_call(tmp_path):
    run_dir = build_run(tmp_path / "run")
    forget_user(run_dir, "alice")
    forget_user(run_dir, "nobody")
    records = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines()]
    # The log keeps the id tables use for the user (a hash), never the key as given.
    assert [r["user_id"] for r in records] == [hashlib.sha256(name).hexdigest() for name in (b"alice", b"nobody")]
    assert "alice" not in (run_dir / LOG).read_text()
    assert records[0]["rows_removed"]["ingest/conversations"] == 2 and "time" in records[0]


def test_a_user_is_found_by_the_key_given_or_by_the_hash_ingest_made_of_it():
    from pipelines.tools.forget import user_mask
    hashed = hashlib.sha256(b"bob@example.com").hexdigest()
    table = pa.table({"user_id": [hashed, "bob@example.com", "carol", None]})
    assert user_mask(table, "bob@example.com").to_pylist() == [True, True, False, False]
    assert user_mask(table, hashed).to_pylist() == [True, False, False, False]
