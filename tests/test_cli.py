"""The `rlhi` command line: help, JSON summaries, and errors that exit 2 with a message."""
from __future__ import annotations

import json

import pytest

from actors.followup_rules import RulesClassifier
from pipelines.cli import main
from pipelines.tools.followup_eval import evaluate_backend
from tests.conftest import FOLLOWUP_LABELS, WILDCHAT_SAMPLE


@pytest.mark.parametrize("command", ["ingest", "run", "eval-followups", "eval-preferences", "train-followups",
                                     "serve", "redeploy"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: rlhi" in capsys.readouterr().out


def test_eval_followups_prints_its_scores_as_json_on_the_last_line(capsys):
    assert main(["eval-followups", "--input", str(WILDCHAT_SAMPLE), "--labels", str(FOLLOWUP_LABELS),
                 "--backend", "rules", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 156 and result["backend"] == "rules"
    direct = evaluate_backend(WILDCHAT_SAMPLE, FOLLOWUP_LABELS, RulesClassifier().classify)
    for key in ("feedback_precision", "feedback_recall", "feedback_f1", "macro_f1"):
        assert result[key] == pytest.approx(direct[key]), key   # the command reports the library's scores
    assert result["per_label"] == direct["per_label"]


def test_a_label_that_matches_no_followup_is_an_error_naming_it(tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"conversation_hash": "nope", "message_index": 2, "label": "positive"}\n')
    assert main(["eval-followups", "--input", str(WILDCHAT_SAMPLE), "--labels", str(labels),
                 "--backend", "rules"]) == 2
    assert "conversation_hash='nope'" in capsys.readouterr().err


def test_a_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("ingest:\n  filters:\n    drop_toxc: true\n")
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "ingest.filters.drop_toxc" in err


def test_a_missing_input_exits_2_naming_it(tmp_path, capsys):
    assert main(["ingest", "--input", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "run")]) == 2
    assert "none.parquet" in capsys.readouterr().err


def test_redeploy_of_a_run_that_trained_nothing_exits_2_saying_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHI_API_TOKEN", "a-token-long-enough")
    config = tmp_path / "serve.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    assert main(["redeploy", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "nothing to redeploy" in err and "run the train stage first" in err


def test_redeploy_of_a_folder_that_holds_no_model_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHI_API_TOKEN", "a-token-long-enough")
    config = tmp_path / "serve.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\n")
    assert main(["redeploy", "--config", str(config), "--policy", str(tmp_path)]) == 2
    assert f"--policy {tmp_path}: not an exported model folder" in capsys.readouterr().err


def test_sim_sweep_refuses_a_run_on_the_evaluation_phrasings(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"family": "eval", "seed": 0, "per_user": {}}))
    assert main(["sim", "sweep", "--from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'eval' phrasing family" in err and "rlhi sim run --family dev" in err


def test_sim_sweep_of_a_folder_with_no_experiment_exits_2_saying_what_to_run(tmp_path, capsys):
    assert main(["sim", "sweep", "--from", str(tmp_path)]) == 2
    assert f"{tmp_path / 'results.json'} is missing" in capsys.readouterr().err


def test_rlhi_ingest_with_a_config_that_has_online_rounds_runs_ingest_alone(tmp_path):
    from pipelines.cli import build_parser, ingest_config
    from pipelines.driver import plan

    args = build_parser().parse_args(["ingest", "--config", "configs/paper-8b.yaml", "--input", "data/x.parquet",
                                      "--out", str(tmp_path / "run")])
    config = ingest_config(args)
    assert plan(config) == [(0, "ingest")] and config.ingest.inputs == ["data/x.parquet"]


def test_rlhi_forget_with_a_missing_folder_exits_2_naming_it(tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "run").mkdir()
    assert main(["forget", "--run-dir", str(tmp_path / "run"), "--user", "u1",
                 "--chat-log", str(tmp_path / "no-such-log")]) == 2
    assert f"chat log folder {tmp_path / 'no-such-log'} does not exist" in capsys.readouterr().err
    assert main(["forget", "--run-dir", str(tmp_path / "gone"), "--user", "u1"]) == 2


def test_from_and_only_together_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--config", "configs/default.yaml", "--from", "rewards", "--only", "pairs"])
    assert exit_.value.code == 2
    assert "argument --only: not allowed with argument --from" in capsys.readouterr().err
