"""Stage `reward_model` (optional): a learned user-based reward from the users' own rewrites.

A Bradley-Terry reward model (an encoder, all-MiniLM-L6-v2 by default, with a one-output
head) learns r(persona, context, answer) such that P(chosen > rejected) =
sigmoid(r(chosen) - r(rejected)), the loss of Ouyang et al. 2022 (InstructGPT, eq. 1).
Its pairs are the kept rows of the round-0 `rewrites` table: the rewrite the user's
feedback asked for is chosen, the answer they complained about is rejected. Training
uses only TRAINING users' pairs (the personas stage's split by user); pairwise accuracy
is reported on EVALUATION users' pairs, on the training pairs for comparison, and for
the fresh head too, so the gain is visible. The `rewards` stage can then score with it
as `RewardModel("trained", "<run_dir>/reward_model/model")`.

The model never filters its own training data: the rewrites stage's quality filter uses
a separate judge (its `margin` column), and this stage takes every kept pair as it is.

The encoder reads a text pair, (`encoder_prompt_text`, answer), exactly as
`RewardModel._trained` scores it. TRL's RewardTrainer tokenizes single texts or chats,
so the pairs are tokenized here (`encode_pairs`, the same call as `score_text_pairs`)
into the `chosen_ids` / `rejected_ids` columns TRL accepts as already processed, and
`PairCollator` adds the encoder's segment ids; TRL keeps the loss and the training loop.
Training runs in the driver process (one small encoder needs no Ray Train), or in one Ray
task holding a GPU when the encoder runs on cuda: a cluster's head node often has none.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from actors.engines.base import as_messages
from actors.engines.reward_scorer import SequenceRewardScorer
from actors.models import ModelSpec
from actors.reward_model import RewardModel, encoder_prompt_text, init_trained_reward_model
from pipelines.config import RunConfig
from pipelines.persona_join import user_splits
from pipelines.schema import MODEL_FOLDER, model_path, stage_dir, table_path
from pipelines.contract import StageWriter, require_stage
from pipelines.rounds import actor_gpus
from pipelines.runtime import in_ray_task

STAGE = "reward_model"
PAIR_COLUMNS = ["user_id", "split", "persona", "context", "chosen", "rejected"]


# ------------------------------------------------------------------------- the pairs

def rewrite_pairs(run_dir: Path | str) -> pd.DataFrame:
    """Kept rewrite pairs of round 0, one row each, with the user's split and persona text.

    Columns `PAIR_COLUMNS`. `context` is the prompt without the policy's system message, its
    first (the scorer renders it again from the persona, as it does at scoring time); a
    system message of the conversation itself stays, as the rewards stage scores with it. Pairs of users the
    personas stage did not split are dropped (there are none in a consistent run).
    """
    run_dir = Path(run_dir)
    rewrites = pq.read_table(table_path(run_dir, "rewrites", "rewrites"))
    kept = rewrites.filter(pc.equal(rewrites.column("status"), "kept")).to_pylist()
    personas = pq.read_table(table_path(run_dir, "personas", "personas"), columns=["persona_id", "persona"])
    persona_text = dict(zip(personas.column("persona_id").to_pylist(),
                            personas.column("persona").to_pylist()))
    splits = user_splits(run_dir)
    rows = [{"user_id": row["user_id"], "split": splits[row["user_id"]],
             "persona": persona_text.get(row["persona_id"], "") if row["persona_id"] else "",
             "context": as_messages(row["prompt"])[1:],   # the conversation's own system message stays
             "chosen": row["chosen"], "rejected": row["rejected"]}
            for row in kept if row["user_id"] in splits]
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def encode_pairs(pairs: pd.DataFrame, scorer: SequenceRewardScorer) -> Any:
    """A `datasets.Dataset` of tokenized pairs in TRL's processed preference format.

    Each side is the text pair (encoder_prompt_text, answer) tokenized as
    `SequenceRewardScorer.score_text_pairs` does (overflow cuts the answer's end), plus the
    segment ids (`chosen_token_type_ids`, ...) when the tokenizer makes them.
    """
    from datasets import Dataset

    columns: dict[str, list[list[int]]] = {}
    for side in ("chosen", "rejected"):
        for persona, context, answer in zip(pairs["persona"], pairs["context"], pairs[side]):
            prompt = encoder_prompt_text(persona, context, answer, scorer)
            encoded = scorer.tokenizer(prompt, answer, truncation="only_second",
                                       max_length=scorer.max_context_tokens)
            columns.setdefault(f"{side}_ids", []).append(encoded["input_ids"])
            if "token_type_ids" in encoded:
                columns.setdefault(f"{side}_token_type_ids", []).append(encoded["token_type_ids"])
    return Dataset.from_dict(columns)


def pairwise_accuracy(reward: RewardModel, pairs: pd.DataFrame) -> float | None:
    """Share of pairs whose chosen answer scores strictly above the rejected one (None: no
    pairs). Scored through `RewardModel.score_batch`, the path the rewards stage uses."""
    if pairs.empty:
        return None
    scores = reward.score_batch(list(pairs["persona"]), list(pairs["context"]),
                                [[c, r] for c, r in zip(pairs["chosen"], pairs["rejected"])])
    return sum(chosen > rejected for chosen, rejected in scores) / len(scores)


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows first, then rejected) plus the encoder's
    segment ids, so training sees the (prompt, answer) pair as scoring encodes it."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "chosen_token_type_ids" in examples[0]:
            segments = [torch.tensor(example[f"{side}_token_type_ids"])
                        for side in ("chosen", "rejected") for example in examples]
            batch["token_type_ids"] = pad(segments, padding_value=0, padding_side="right",
                                          pad_to_multiple_of=self.pad_to_multiple_of)
        return batch


# ------------------------------------------------------------------------- the stage

def run_reward_model(config: RunConfig) -> dict[str, Any]:
    """Train the `trained` reward model into `<run_dir>/reward_model/` (`model/`,
    `summary.json`, manifest) and return the summary."""
    run_dir, settings = Path(config.run_dir), config.reward_model
    upstream = {name: require_stage(run_dir, name) for name in ("rewrites", "personas")}
    pairs = rewrite_pairs(run_dir)
    train, held_out = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "eval"]
    if train.empty:
        raise RuntimeError(
            f"reward_model: no training pairs. {table_path(run_dir, 'rewrites', 'rewrites')} has {len(pairs)} kept "
            f"pairs, none from a training user (split in {table_path(run_dir, 'personas', 'users')}). Give the run "
            "more data (more conversations with feedback follow-ups, so more rewrites are kept), "
            "or drop 'reward_model' from `stages` and score rewards with the judge or classifier.")
    gpus = actor_gpus(settings.encoder)
    with StageWriter(run_dir, STAGE) as stage:
        # A cluster's driver runs on the head node, which often has no GPU: an encoder on
        # cuda trains in a task that holds one.
        summary = (in_ray_task(train_into, config, train, held_out, stage.tmp, num_gpus=gpus) if gpus
                   else train_into(config, train, held_out, stage.tmp))
        (stage.tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        stage.commit(config=config, upstream=upstream, models=[settings.encoder.model_dump()], counts=summary)
    summary["output"] = str(stage_dir(run_dir, STAGE))
    return summary


def train_into(config: RunConfig, train: pd.DataFrame, held_out: pd.DataFrame, folder: Path) -> dict[str, Any]:
    """Train on `train`, score both splits before and after, save the model into
    `folder/model/`; returns the summary."""
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    settings, started = config.reward_model, time.time()
    set_seed(config.seed)  # the fresh head's initialisation
    model, tokenizer = init_trained_reward_model(settings.encoder)
    window = min(settings.max_length, int(getattr(model.config, "max_position_embeddings", 512)))
    spec = settings.encoder.model_copy(update={"max_context_tokens": window})
    scorer = SequenceRewardScorer(spec, model=model, tokenizer=tokenizer)
    reward = RewardModel("trained", spec, scorer=scorer)
    before = {"eval": pairwise_accuracy(reward, held_out), "train": pairwise_accuracy(reward, train)}

    scratch = folder / "trainer"
    args = RewardConfig(
        output_dir=str(scratch), num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate, per_device_train_batch_size=settings.batch_size,
        max_length=window, seed=config.seed, data_seed=config.seed,
        remove_unused_columns=False,  # keep the segment-id columns for PairCollator
        save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True,
        use_cpu=scorer.device == "cpu")
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=encode_pairs(train, scorer),
        processing_class=tokenizer,
        data_collator=PairCollator(pad_token_id=tokenizer.pad_token_id))
    result = trainer.train()
    model.eval()
    after = {"eval": pairwise_accuracy(reward, held_out), "train": pairwise_accuracy(reward, train)}

    model.save_pretrained(folder / MODEL_FOLDER, safe_serialization=True)
    tokenizer.save_pretrained(folder / MODEL_FOLDER)
    shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "train_pairs": len(train), "eval_pairs": len(held_out),
        "train_users": int(train["user_id"].nunique()),
        "eval_users": int(held_out["user_id"].nunique()),
        "accuracy_before": before, "accuracy_after": after,
        "loss": round(float(result.training_loss), 6),
        "steps": int(result.global_step),
        "seconds": round(time.time() - started, 3),
        "encoder": settings.encoder.id, "max_length": window,
        "device": str(trainer.args.device),
    }
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def trained_model_spec(run_dir: Path | str) -> ModelSpec:
    """The spec the rewards stage loads the trained model with (backend `trained`)."""
    return ModelSpec(id=str(model_path(run_dir, STAGE).resolve()))
