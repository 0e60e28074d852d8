"""The driver's resume behaviour (pipelines/driver.py) on a copy of the session's run of
ingest, followups and personas: an unchanged rerun does no work, a changed setting reruns
that stage and the ones after it, a stage that died midway is redone, --from and --only."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import WILDCHAT_SAMPLE
from pipelines.config import parse_config
from pipelines.driver import plan, run_pipeline, select_steps, step_key


def config_for(run_dir, **changes):
    data = {"run_dir": str(run_dir), "ingest": {"inputs": [str(WILDCHAT_SAMPLE)]},
            "resources": {"progress_bars": False}, "stages": ["ingest", "followups", "personas"]}
    data.update(changes)
    return parse_config(data)


@pytest.fixture
def run_copy(pipeline_run, tmp_path):
    source, _ = pipeline_run
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run"


def statuses(result):
    return {name: step["status"] for name, step in result["stages"].items()}


def test_keys_chain_along_the_plan():
    config = config_for("/tmp/x")
    changed = config_for("/tmp/x", personas={"cadence": 3})
    keys, changed_keys, previous, previous_changed = [], [], None, None
    for k, stage in plan(config):
        previous = step_key(config, k, stage, previous)
        previous_changed = step_key(changed, k, stage, previous_changed)
        keys.append(previous)
        changed_keys.append(previous_changed)
    assert keys[:2] == changed_keys[:2] and keys[2] != changed_keys[2]


def test_inputs_downloaded_into_another_working_copy_give_the_same_ingest_key(tmp_path):
    """A run in object storage resumed on another machine: its working copy (and the inputs
    downloaded into it) lies elsewhere, and ingest must still be current."""
    keys = []
    for machine in ("a", "b"):
        work = tmp_path / machine / "work"
        download = work / ".inputs" / "0123456789abcdef" / "train-00000.parquet"
        download.parent.mkdir(parents=True)
        shutil.copy(WILDCHAT_SAMPLE, download)
        config = config_for(work).model_copy(update={"ingest": config_for(work).ingest.model_copy(
            update={"inputs": [str(download)]})})
        keys.append(step_key(config, 0, "ingest", None))
    assert keys[0] == keys[1]
    other = tmp_path / "elsewhere.parquet"       # a local input is still named by its path
    shutil.copy(WILDCHAT_SAMPLE, other)
    moved = config_for(tmp_path / "a" / "work").model_copy(update={"ingest": config_for(tmp_path).ingest.model_copy(
        update={"inputs": [str(other)]})})
    assert step_key(moved, 0, "ingest", None) != keys[0]


def test_weights_exported_again_into_the_same_folder_rerun_the_steps_that_use_them(tmp_path):
    model = tmp_path / "policy"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights of round one")
    config = config_for(tmp_path / "run", stages=["ingest", "followups", "personas", "rewrites", "train"],
                        models={"policy": {"id": str(model)}})
    (tmp_path / "run").mkdir()
    first = step_key(config, 0, "train", "previous")
    assert step_key(config, 0, "train", "previous") == first
    (model / "model.safetensors").write_bytes(b"weights of round two")   # same size, new content
    second = step_key(config, 0, "train", "previous")
    assert second != first
    # The same bytes copied in again (a new mtime) keep the key; the digests are cached by
    # path, size and mtime, so an unchanged model is not read again.
    (model / "model.safetensors").write_bytes(b"weights of round two")
    assert step_key(config, 0, "train", "previous") == second
    (model / ".git").mkdir()   # a git clone's own files are not the model
    (model / ".git" / "index").write_bytes(b"rewritten by a git command")
    assert step_key(config, 0, "train", "previous") == second
    cached = json.loads((tmp_path / "run" / ".model-digests.json").read_text())
    assert sorted(cached) == [str((model / "config.json").resolve()), str((model / "model.safetensors").resolve())]
    # Training from the changed weights never resumes the checkpoints of the old ones.
    from pipelines.stages.train.stage import run_key
    (model / "model.safetensors").write_bytes(b"weights of round one")
    before = run_key(config, str(model), {"started_at": "pairs-1"})
    (model / "model.safetensors").write_bytes(b"weights of round two")
    assert run_key(config, str(model), {"started_at": "pairs-1"}) != before
    # A stage whose settings name no model folder keeps its key whatever the folder holds.
    assert step_key(config, 0, "personas", "previous") == step_key(
        config_for(tmp_path / "run", stages=config.stages), 0, "personas", "previous")


def test_same_config_twice_does_no_work(run_copy, capsys):
    result = run_pipeline(config_for(run_copy), report=False)
    assert statuses(result) == {"ingest": "skipped", "followups": "skipped", "personas": "skipped"}
    assert result["stages"]["ingest"]["counts"]["kept"] == 47
    assert "skipped" in capsys.readouterr().out
    assert json.loads((run_copy / "plan.json").read_text()) == {
        "online_rounds": 0, "steps": ["ingest", "followups", "personas"]}


def test_changed_setting_reruns_from_that_stage_and_a_killed_stage_is_redone(run_copy, monkeypatch):
    import pipelines.stages.personas

    changed = config_for(run_copy, personas={"cadence": 2})
    before = json.loads((run_copy / "personas" / "manifest.json").read_text())

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(pipelines.stages.personas, "split_users", die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(changed, report=False)
    # the old output stays in place, untouched; the half-written one is only a .tmp folder
    assert json.loads((run_copy / "personas" / "manifest.json").read_text()) == before
    assert list(run_copy.glob(".personas.tmp-*"))
    monkeypatch.undo()

    result = run_pipeline(changed, report=False)
    assert statuses(result) == {"ingest": "skipped", "followups": "skipped", "personas": "ran"}
    assert not list(run_copy.glob(".personas.tmp-*"))
    again = run_pipeline(changed, report=False)
    assert statuses(again) == {"ingest": "skipped", "followups": "skipped", "personas": "skipped"}


def test_a_step_run_alone_is_current_for_the_next_plain_run_and_from_needs_no_kept_inputs(run_copy):
    result = run_pipeline(config_for(run_copy), only="personas", report=False)
    assert statuses(result) == {"personas": "ran"}
    again = run_pipeline(config_for(run_copy), report=False)   # --only chained its key as a plain run does
    assert statuses(again) == {"ingest": "skipped", "followups": "skipped", "personas": "skipped"}
    # Ingest is kept by --from: its input file, since moved away, is not read again.
    moved = config_for(run_copy, ingest={"inputs": [str(run_copy / "moved-away.parquet")]})
    result = run_pipeline(moved, start="personas", report=False)
    assert statuses(result) == {"ingest": "skipped", "followups": "skipped", "personas": "ran"}


def test_from_and_only_select_steps():
    config = config_for("/tmp/x", stages=["ingest", "followups", "personas", "rewards", "pairs", "train"],
                        online={"rounds": 1})
    assert [m for _, _, m in select_steps(config, "personas", None)][:4] == ["keep", "keep", "force", "force"]
    assert [(k, s) for k, s, _ in select_steps(config, None, "round-1/train")] == [(1, "train")]
    with pytest.raises(ValueError, match="not a step of this configuration's plan"):
        select_steps(config, "evaluate", None)


def test_forget_outlives_a_rerun_of_ingest(run_copy, capsys):
    from pipelines.cli import main

    users = pq.read_table(run_copy / "personas" / "users").column("user_id").to_pylist()
    assert main(["forget", "--run-dir", str(run_copy), "--user", users[0], "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["total_rows_removed"] > 0
    result = run_pipeline(config_for(run_copy, ingest={"inputs": [str(WILDCHAT_SAMPLE)], "rows_per_task": 500}),
                          report=False)
    assert result["stages"]["ingest"]["status"] == "ran"
    for table in ("ingest/conversations", "followups/followups", "personas/personas", "personas/users"):
        assert users[0] not in pq.read_table(run_copy / table).column("user_id").to_pylist(), table


def test_the_rerun_key_covers_exactly_the_code_each_step_runs(tmp_path):
    """Keys computed over a copy of the source tree: an edit to a module reruns the steps
    whose stage imports it (and, through the chain, every step after), nothing else does."""
    from tests.conftest import REPO
    from pipelines.code_hash import code_hash, module_closure
    from pipelines.driver import step_keys

    for package in ("actors", "pipelines", "serve", "sim"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    config = config_for("/tmp/x", stages=["ingest", "followups", "personas", "rewrites", "rewards", "pairs",
                                          "train", "evaluate"], online={"rounds": 1})

    def keys_after(path, line):
        code_hash.cache_clear()
        with open(tmp_path / path, "a") as handle:
            handle.write(line)
        return step_keys(config, code_root=tmp_path)

    def changed(before, after):
        return [name for name in before if before[name] != after[name]]

    before = keys_after("README.md", "")
    assert changed(before, keys_after("README.md", "\nan edit to the docs\n")) == []
    steps = list(before)
    followups_on = keys_after("actors/followup_rules.py", "\n# an edit\n")
    assert changed(before, followups_on) == steps[steps.index("followups"):]
    pairs_on = keys_after("pipelines/stages/pairs.py", "\n# an edit\n")
    assert changed(followups_on, pairs_on) == steps[steps.index("pairs"):]
    assert "pipelines.stages.rewards" not in module_closure("pipelines.stages.pairs", tmp_path)
