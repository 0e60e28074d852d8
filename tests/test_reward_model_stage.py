"""Stage `reward_model`: a Bradley-Terry reward model trained on training users' rewrites.

A fake run directory holds the personas and rewrites tables (with manifests) the stage
reads. Chosen answers follow a learnable pattern (they take up the user's topic and say
how; rejected ones brush the request off), so a tiny BERT learns it in a few epochs. Length
does not decide: half the rejected answers are longer than the chosen ones, so the model is
graded on held-out users' pairs that a length heuristic gets half right.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.models import MINILM, ModelSpec, ModelUnavailableError, resolve_model
from actors.prompts import render
from actors.reward_model import RewardModel, init_trained_reward_model
from pipelines.config import RunConfig
from pipelines.schema import PERSONAS, REWRITES, USERS
from pipelines.contract import StageWriter

TOPICS = {"u-train-0": "Python code", "u-train-1": "French cooking", "u-train-2": "robot stories",
          "u-train-3": "Italian travel", "u-train-4": "tax forms", "u-train-5": "chess openings",
          "u-eval-0": "garden design", "u-eval-1": "guitar chords"}
PAIRS_PER_USER = 4
HELPFUL = ["Sure, here is a detailed answer about {topic}: start with the basics, then go step by step.",
           "For {topic}, do this step by step: first the basics, then one worked example.",
           "Here are the steps for {topic}: first the basics, then practice, then a check.",
           "About {topic}: start with the basics, then follow each step in order."]
BRUSH_OFFS = ["No.",
              "I am sorry, but I cannot help with that request right now, please try searching "
              "online somewhere else instead of asking me about it.",
              "Try searching online.",
              "Unfortunately that is not something I am able to help with today, so you may want "
              "to look elsewhere for it, sorry about that."]


def split_of(user: str) -> str:
    return "eval" if user.startswith("u-eval") else "train"


def rewrite_row(user: str, index: int, *, status: str = "kept", system: str | None = None) -> dict:
    topic = TOPICS[user]
    persona = f"Cares about {topic}; likes detailed, step-by-step answers."
    context = [{"role": "user", "content": f"Question {index} about {topic}, please."}]
    context = [{"role": "system", "content": system}, *context] if system else context
    return {
        "followup_id": f"{user}-f{index}", "conversation_id": f"{user}-c{index}",
        "user_id": user, "persona_id": f"{user}-p", "turn_index": 0,
        "prompt": render("policy", persona, context),
        "chosen": HELPFUL[index % len(HELPFUL)].format(topic=topic),
        "rejected": BRUSH_OFFS[index % len(BRUSH_OFFS)],
        "rejected_source": "original", "label": "reattempt_feedback", "margin": 0.4,
        "status": status, "reason": None if status == "kept" else "judge_prefers_original",
        "round": 0,
    }


def write_run(run_dir: Path, users: list[str], *, kept_for: set[str]) -> None:
    """personas (personas + users tables) and rewrites stages, committed with manifests."""
    now = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with StageWriter(run_dir, "personas") as stage:
        for name in ("personas", "users"):
            (stage.tmp / name).mkdir()
        personas = [{"persona_id": f"{u}-p", "user_id": u, "as_of": now,
                     "persona": f"Cares about {TOPICS[u]}; likes detailed, step-by-step answers.",
                     "history_conversations": 3, "history_tokens": 50, "redactions": 0,
                     "backend": "extractive", "serving": False} for u in users]
        pq.write_table(pa.Table.from_pylist(personas, schema=PERSONAS),
                       stage.tmp / "personas" / "part-0.parquet")
        rows = [{"user_id": u, "split": split_of(u), "conversations": 5, "has_history": True}
                for u in users]
        pq.write_table(pa.Table.from_pylist(rows, schema=USERS), stage.tmp / "users" / "part-0.parquet")
        stage.commit(config_hash="test", inputs=[], counts={}, seed=0)
    with StageWriter(run_dir, "rewrites") as stage:
        (stage.tmp / "rewrites").mkdir()
        rows = [rewrite_row(u, i) for u in users if u in kept_for for i in range(PAIRS_PER_USER)]
        rows += [rewrite_row(u, 99, status="filtered") for u in users]
        pq.write_table(pa.Table.from_pylist(rows, schema=REWRITES),
                       stage.tmp / "rewrites" / "part-0.parquet")
        stage.commit(config_hash="test", inputs=[], counts={}, seed=0)


def stage_config(run_dir: Path, tiny_models, **settings) -> RunConfig:
    encoder = ModelSpec(id=str(tiny_models.encoder_reward), device="cpu")
    return RunConfig(run_dir=str(run_dir), seed=0, reward_model={
        "encoder": encoder.model_dump(), "epochs": 4, "learning_rate": 1e-3, "batch_size": 4,
        **settings})


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory):
    """One trained stage shared by the tests that read its outputs."""
    from pipelines.stages.train_reward_model import run_reward_model

    run_dir = tmp_path_factory.mktemp("run")
    write_run(run_dir, list(TOPICS), kept_for=set(TOPICS))
    summary = run_reward_model(stage_config(run_dir, tiny_models))
    return run_dir, summary


def test_summary_reports_pairs_and_accuracy_before_and_after_training(trained_run):
    run_dir, summary = trained_run
    saved = json.loads((run_dir / "reward_model" / "summary.json").read_text())
    assert saved["train_pairs"] == 6 * PAIRS_PER_USER      # filtered rows are not pairs
    assert saved["eval_pairs"] == 2 * PAIRS_PER_USER
    assert saved["accuracy_after"]["eval"] >= 0.75          # unseen users and topics, same pattern
    assert saved["accuracy_after"]["eval"] > saved["accuracy_before"]["eval"]
    assert saved["encoder"] == summary["encoder"] and saved["loss"] > 0
    manifest = json.loads((run_dir / "reward_model" / "manifest.json").read_text())
    assert set(manifest["upstream"]) == {"rewrites", "personas"}


def test_held_out_pairs_are_not_decided_by_length():
    rows = [rewrite_row(user, i) for user in TOPICS if split_of(user) == "eval" for i in range(PAIRS_PER_USER)]
    longer_chosen = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    assert longer_chosen == len(rows) // 2


def test_the_saved_model_loads_as_the_trained_backend_and_ranks_held_out_pairs(trained_run):
    run_dir, summary = trained_run
    folder = run_dir / "reward_model" / "model"
    assert (folder / "model.safetensors").is_file()
    reward = RewardModel("trained", str(folder))
    rows = [rewrite_row(user, i) for user in TOPICS if split_of(user) == "eval"
            for i in range(PAIRS_PER_USER)]
    contexts = [[m for m in row["prompt"] if m["role"] != "system"] for row in rows]
    personas = [f"Cares about {TOPICS[row['user_id']]}; likes detailed, step-by-step answers."
                for row in rows]
    scores = reward.score_batch(personas, contexts, [[r["chosen"], r["rejected"]] for r in rows])
    ranked_right = sum(chosen > rejected for chosen, rejected in scores)
    assert ranked_right >= 0.75 * len(rows)
    assert ranked_right / len(rows) == summary["accuracy_after"]["eval"]  # the stage's figure, reproduced


def test_the_split_is_respected_no_eval_user_trains(trained_run):
    from pipelines.stages.train_reward_model import rewrite_pairs

    run_dir, summary = trained_run
    pairs = rewrite_pairs(run_dir)
    train_users = set(pairs[pairs["split"] == "train"]["user_id"])
    eval_users = set(pairs[pairs["split"] == "eval"]["user_id"])
    assert train_users == {u for u in TOPICS if split_of(u) == "train"}
    assert eval_users == {u for u in TOPICS if split_of(u) == "eval"}
    assert summary["train_users"] == len(train_users) and summary["eval_users"] == len(eval_users)


def encoder_folder(name: str, tiny_models) -> str:
    """The tiny BERT (no segment ids), or the real MiniLM (segment ids) when installed."""
    if name == "tiny-bert":
        return str(tiny_models.encoder_reward)
    try:
        return resolve_model(MINILM)
    except ModelUnavailableError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize("encoder", ["tiny-bert", "minilm"])
def test_training_encodes_pairs_exactly_as_scoring_does(encoder, tiny_models, tmp_path):
    """The collated training batch, run through the model, gives the scores RewardModel gives."""
    import torch

    from actors.engines.reward_scorer import SequenceRewardScorer
    from pipelines.stages.train_reward_model import PairCollator, encode_pairs, rewrite_pairs

    write_run(tmp_path, ["u-train-0", "u-eval-0"], kept_for={"u-train-0", "u-eval-0"})
    pairs = rewrite_pairs(tmp_path)
    spec = ModelSpec(id=encoder_folder(encoder, tiny_models), device="cpu")
    scorer = SequenceRewardScorer(spec, *init_trained_reward_model(spec))
    dataset = encode_pairs(pairs, scorer)
    batch = PairCollator(pad_token_id=scorer.tokenizer.pad_token_id)(list(dataset))
    with torch.inference_mode():
        trained_view = scorer.model(**batch).logits[:, 0].tolist()
    scores = RewardModel("trained", scorer.spec, scorer=scorer).score_batch(
        list(pairs["persona"]), list(pairs["context"]),
        [[c, r] for c, r in zip(pairs["chosen"], pairs["rejected"])])
    scoring_view = [s[0] for s in scores] + [s[1] for s in scores]
    assert trained_view == pytest.approx(scoring_view, abs=1e-4)


def test_a_conversations_own_system_message_is_in_the_training_text_as_in_the_scoring_text(tmp_path):
    from pipelines.stages.train_reward_model import rewrite_pairs

    write_run(tmp_path, ["u-train-0"], kept_for=set())
    with StageWriter(tmp_path, "rewrites") as stage:   # replaces write_run's with one kept pair
        (stage.tmp / "rewrites").mkdir()
        pq.write_table(pa.Table.from_pylist([rewrite_row("u-train-0", 0, system="You are a pirate assistant.")],
                                            schema=REWRITES), stage.tmp / "rewrites" / "part-0.parquet")
        stage.commit(config_hash="test", inputs=[], counts={}, seed=0)
    [context] = list(rewrite_pairs(tmp_path)["context"])
    assert [(m["role"], m["content"]) for m in context] == [
        ("system", "You are a pirate assistant."), ("user", "Question 0 about Python code, please.")]


def test_the_stage_is_deterministic_for_a_seed(trained_run, tiny_models, tmp_path):
    from pipelines.stages.train_reward_model import run_reward_model

    _, first = trained_run
    write_run(tmp_path, list(TOPICS), kept_for=set(TOPICS))
    again = run_reward_model(stage_config(tmp_path, tiny_models))
    assert again["loss"] == first["loss"]
    assert again["accuracy_after"] == first["accuracy_after"]


def test_training_in_a_ray_task_gives_the_same_model(ray_session, trained_run, tiny_models, tmp_path):
    """An encoder on cuda trains in a Ray task holding a GPU (a cluster's head node often has
    none): the same training on a worker (CPU here) writes the same model into the folder."""
    from pipelines.runtime import in_ray_task
    from pipelines.stages.train_reward_model import rewrite_pairs, train_into

    run_dir, first = trained_run
    pairs = rewrite_pairs(run_dir)
    summary = in_ray_task(train_into, stage_config(run_dir, tiny_models), pairs[pairs["split"] == "train"],
                          pairs[pairs["split"] == "eval"], tmp_path)
    # Ray gives a one-CPU task one math thread, so sums are ordered differently: the loss
    # agrees to float noise, the accuracies exactly.
    assert summary["accuracy_after"] == first["accuracy_after"]
    assert summary["loss"] == pytest.approx(first["loss"], rel=1e-2)
    assert ((tmp_path / "model" / "model.safetensors").stat().st_size
            == (run_dir / "reward_model" / "model" / "model.safetensors").stat().st_size)


def test_an_encoder_on_cuda_trains_in_a_gpu_task(tiny_models, tmp_path, monkeypatch):
    from pipelines.stages import train_reward_model as stage

    write_run(tmp_path, list(TOPICS), kept_for=set(TOPICS))
    config = stage_config(tmp_path, tiny_models)
    on_gpu = config.model_copy(update={"reward_model": config.reward_model.model_copy(
        update={"encoder": config.reward_model.encoder.model_copy(update={"device": "cuda"})})})
    calls = []

    def task(fn, run_config, train, held_out, folder, num_gpus=0.0):
        calls.append((fn.__name__, run_config.reward_model.encoder.device, num_gpus))
        return fn(config, train, held_out, folder)     # the CPU twin: no GPU on this machine

    monkeypatch.setattr(stage, "in_ray_task", task)
    summary = stage.run_reward_model(on_gpu)
    assert calls == [("train_into", "cuda", 1.0)] and summary["train_pairs"] > 0


def test_zero_training_pairs_is_a_clear_error_and_publishes_nothing(tiny_models, tmp_path):
    from pipelines.stages.train_reward_model import run_reward_model

    write_run(tmp_path, list(TOPICS), kept_for={"u-eval-0", "u-eval-1"})
    with pytest.raises(RuntimeError, match=r"no training pairs.*rewrites/rewrites.*drop 'reward_model'"):
        run_reward_model(stage_config(tmp_path, tiny_models))
    assert not (tmp_path / "reward_model").exists()
