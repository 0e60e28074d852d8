"""`write_report` turns a run directory into report.md and PNG plots, for any stages that ran."""
from __future__ import annotations

import json
import re

from pipelines.tools.report import write_report
from pipelines.contract import StageWriter
from tests.test_forget import build_run

PLOTS = ("stage_seconds.png", "followups_by_label.png", "pairs_by_source_label.png", "dpo_training.png")


def section(markdown: str, title: str) -> str:
    """The text of one `## title` section."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_report_writes_every_plot_and_links_it(tmp_path):
    run_dir = build_run(tmp_path / "run")
    path = write_report(run_dir)
    assert path == run_dir / "report" / "report.md"
    markdown = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(PLOTS)
    for name in PLOTS:
        png = path.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_counts_pairs_rewrites_and_rewards_per_round(tmp_path):
    markdown = write_report(build_run(tmp_path / "run")).read_text()
    assert "| 1 | rewrite | 2 | 0 |" in section(markdown, "Preference pairs")  # alice and bob, round 1
    assert "| rewrite: correction | 1 | 0 |" in section(markdown, "Preference pairs")
    assert "| 0 | filtered: judge_prefers_original | 1 |" in section(markdown, "Rewrites kept and filtered")
    assert "| 1 | filtered: below_threshold | 1 |" in section(markdown, "Reward samples kept and filtered")
    assert "| 1 | 2 | 5 | 0.440 | 0.800 | 0.750 | 0.600 |" in section(markdown, "DPO training")


def test_report_uses_the_drivers_stage_status(tmp_path):
    run_dir = build_run(tmp_path / "run")
    markdown = write_report(run_dir, {"ingest": "skipped", "round-1/train": {"status": "ran"},
                                      "followups": {"followups": 4}}).read_text()
    stages = section(markdown, "Stages")
    assert "| ingest | skipped |" in stages
    assert "| round-1/train | ran |" in stages
    assert "| followups | ran |" in stages  # a summary without status: it ran
    assert "| personas | done |" in stages  # not in stage_results: finished earlier


def test_report_of_a_run_with_only_ingest_says_not_run_for_the_rest(tmp_path):
    run_dir = tmp_path / "run"
    with StageWriter(run_dir, "ingest") as stage:
        (stage.tmp / "summary.json").write_text(json.dumps({"rows_in": 5, "kept": 4, "users": 2}))
        stage.commit(config_hash="h", inputs=[], counts={"rows_in": 5, "kept": 4}, seed=0)
    markdown = write_report(run_dir).read_text()
    assert "- rows in: 5; conversations kept: 4; users: 2" in section(markdown, "Ingest")
    for title in ("Follow-ups by label", "Rewrites kept and filtered", "Reward model",
                  "Reward samples kept and filtered", "Preference pairs", "DPO training"):
        assert section(markdown, title).strip() == "_not run_", title
    assert "| train | not run |" in section(markdown, "Stages")
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["report.md", "stage_seconds.png"]


def test_report_says_evaluation_arrives_with_the_evaluate_stage(tmp_path):
    markdown = write_report(build_run(tmp_path / "run")).read_text()
    assert "_not run: add `evaluate`" in section(markdown, "Evaluation")


def test_report_shows_evaluation_win_rates_with_intervals(tmp_path):
    run_dir = build_run(tmp_path / "run")
    (run_dir / "evaluate").mkdir()
    (run_dir / "evaluate" / "summary.json").write_text(json.dumps({"arms": {
        "persona-dpo vs base": {"mean": 0.62, "ci_low": 0.55, "ci_high": 0.69, "n": 200},
        "no-persona vs base": {"mean": 0.51}}}))
    evaluation = section(write_report(run_dir).read_text(), "Evaluation")
    assert "| arm | win rate | ci low | ci high | n |" in evaluation
    assert "| persona-dpo vs base | 0.620 | 0.550 | 0.690 | 200 |" in evaluation
    assert "| no-persona vs base | 0.510 | - | - | - |" in evaluation


def test_report_survives_an_unreadable_table(tmp_path):
    run_dir = build_run(tmp_path / "run")
    (run_dir / "followups" / "followups" / "part-0.parquet").write_bytes(b"not parquet")
    markdown = write_report(run_dir).read_text()
    assert "could not be written" in markdown
    assert "## DPO training" in markdown


def test_report_labels_a_later_rounds_rewrite_pairs_from_that_rounds_followups(tmp_path):
    from tests.test_forget import pair, write_stage

    run_dir = build_run(tmp_path / "run")
    round_2 = run_dir / "round-2"      # a served_logs round: its own follow-ups, its own pairs
    write_stage(round_2, "followups", {"followups": [{"followup_id": "f-carol", "user_id": "carol",
                                                      "label": "complaint"}]}, {"followups": 1})
    write_stage(round_2, "pairs", {"pairs": [pair("alice", "rewrite", 2) | {"followup_id": "f-carol"}]}, {"pairs": 1})
    markdown = write_report(run_dir).read_text()
    assert "| rewrite: complaint |" in section(markdown, "Preference pairs")
    assert "unknown" not in section(markdown, "Preference pairs")


def test_round_folders_of_an_earlier_longer_plan_are_not_this_runs(tmp_path):
    import shutil

    from pipelines.config import parse_config
    from pipelines.driver import write_plan
    from pipelines.tools.report import Run
    from serve.replicas import serving_personas_round

    run_dir = build_run(tmp_path / "run")   # rounds 0 and 1
    shutil.copytree(run_dir / "round-1", run_dir / "round-2")   # left by a plan of two online rounds
    with StageWriter(run_dir, "personas", 2) as stage:
        stage.commit(config_hash="earlier", counts={}, seed=0)
    assert Run(run_dir, run_dir / "report", {}).rounds == [0, 1, 2]   # no plan recorded: every folder
    write_plan(parse_config({"run_dir": str(run_dir), "online": {"rounds": 1}}))
    assert json.loads((run_dir / "plan.json").read_text())["online_rounds"] == 1
    assert Run(run_dir, run_dir / "report", {}).rounds == [0, 1]
    assert serving_personas_round(run_dir)[0] == 0   # round 1 built no personas; round 2 is not this run's
    assert "round-2/" not in write_report(run_dir).read_text()
