"""What each Ray Train worker runs for the `train` stage: TRL's DPOTrainer on the pairs.

Every worker builds the same dataset from the pairs table; the trainer's distributed
sampler (accelerate) gives each rank its own share of every global batch, so nothing is
sharded twice. Rank 0 reports Hugging Face checkpoints (safetensors) to Ray Train, which
keeps them under the run's storage path; after a failure Ray Train restarts the worker
group and `ray.train.get_checkpoint()` hands back the newest one, from which the
transformers Trainer restores weights, optimizer, scheduler and its place in the data.

The ledger: each optimizer step appends the pair indices every rank trained on to
`<storage>/ledger/rank-<r>.jsonl`. A resumed attempt redoes the steps after its checkpoint,
so the latest attempt's records of a step win; `read_ledger` then shows whether every pair was seen
exactly once per epoch (the fault test checks this).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

LEDGER = "ledger"
EXPORT = "export"          # <storage>/export: the final policy, moved into the stage folder
RESULT = "result.json"     # <storage>/result.json: final metrics, written by rank 0


def prepare_pairs(pairs_dir: str, sources: list[str], tokenizer, max_length: int,
                  global_batch: int) -> tuple[list[dict], list[dict], dict[str, list[str]]]:
    """Train and eval rows in TRL's conversational preference format, and what was left out.

    Rows are ordered by pair_id so every worker (and every rerun) builds the same dataset;
    `pair_index` is each train row's position, for the ledger. Left out, by pair_id:
    `too_long`, a prompt that alone fills max_length (TRL would drop it silently, shifting
    every batch), and `remainder`, the train pairs after the last whole global batch
    (workers x per-device batch), which accelerate would otherwise pad with repeats.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from actors.engines.transformers_engine import chat_token_ids

    table = pq.read_table(pairs_dir)
    table = table.filter(pc.is_in(table.column("source"), value_set=pa.array(sources))).sort_by("pair_id")
    columns = ["prompt", "chosen", "rejected", "pair_id"]
    left_out: dict[str, list[str]] = {"too_long": [], "remainder": []}

    def fits(row: dict) -> bool:
        if len(chat_token_ids(tokenizer, row["prompt"])) < max_length:
            return True
        left_out["too_long"].append(row["pair_id"])
        return False

    split = lambda name: [r for r in table.filter(pc.equal(table.column("split"), name))  # noqa: E731
                          .select(columns).to_pylist() if fits(r)]
    train, evaluation = split("train"), split("eval")
    keep = len(train) - len(train) % global_batch
    left_out["remainder"] = [row["pair_id"] for row in train[keep:]]
    train = [{**row, "pair_index": i} for i, row in enumerate(train[:keep])]
    return train, evaluation, left_out


def load_pair_datasets(pairs_dir: str, sources: list[str], tokenizer, max_length: int, global_batch: int):
    """`prepare_pairs` as `datasets.Dataset`s (train with `pair_index`; eval None if empty)."""
    from datasets import Dataset

    from actors.engines.transformers_engine import sanitizing

    train, evaluation, left_out = prepare_pairs(pairs_dir, sources, tokenizer, max_length, global_batch)
    fields = ("prompt", "chosen", "rejected")
    # TRL tokenizes each row with its chat_template_kwargs: control tokens a user typed stay
    # plain text, as when the policy sampled the answer and as it will be served.
    sanitize = sanitizing(tokenizer)
    kwargs = {"chat_template_kwargs": sanitize} if sanitize else {}
    train_set = Dataset.from_list([{**{k: r[k] for k in fields}, "pair_index": r["pair_index"], **kwargs}
                                   for r in train]) if train else None
    eval_set = Dataset.from_list([{**{k: r[k] for k in fields}, **kwargs} for r in evaluation]) if evaluation else None
    return train_set, eval_set, left_out


def load_policy_tokenizer(policy: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ledger_trainer_class():
    from trl import DPOTrainer

    class LedgerDPOTrainer(DPOTrainer):
        """DPOTrainer that records which pairs each optimizer step trained on."""

        ledger_path: Path | None = None
        attempt = time.time()  # tells a resumed attempt's records from the failed one's

        def training_step(self, model, inputs, *args, **kwargs):
            indices = inputs.pop("pair_index", None)
            if indices is not None and self.ledger_path is not None:
                record = {"step": self.state.global_step + 1, "attempt": self.attempt,
                          "pairs": [int(i) for i in indices.tolist()]}
                with open(self.ledger_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_ref_log_probs(self, model, inputs):
            inputs = {k: v for k, v in inputs.items() if k != "pair_index"}
            return super().compute_ref_log_probs(model, inputs)

    return LedgerDPOTrainer


class _IndexCollator:
    """TRL's preference collator, plus the `pair_index` of every example in the batch."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, examples):
        import torch

        batch = self.base([{k: v for k, v in e.items() if k != "pair_index"} for e in examples])
        if "pair_index" in examples[0]:
            batch["pair_index"] = torch.tensor([e["pair_index"] for e in examples])
        return batch


def _report_callback(rank: int, worker_count: int):
    """Rank 0 reports each saved checkpoint; every rank calls `report` (it is a barrier)."""
    import shutil
    import tempfile

    import ray.train
    import transformers
    from transformers import TrainerCallback

    class ReportCheckpoints(TrainerCallback):
        def __init__(self) -> None:
            self.last_log_time = time.time()
            self.last_log_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            # Start the clock at training, not at model load; after a resume, count steps
            # from the checkpoint's step.
            self.last_log_time, self.last_log_step = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Throughput between logs, next to TRL's loss, reward accuracy, margins, log-probs.
            now = time.time()
            steps = state.global_step - self.last_log_step
            if logs is not None and steps > 0 and "loss" in logs:
                per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * worker_count
                rate = round(steps * per_step / max(now - self.last_log_time, 1e-9), 3)
                logs["samples_per_second"] = rate
                if state.log_history:   # the Trainer stored a copy of `logs` before callbacks
                    state.log_history[-1]["samples_per_second"] = rate
                self.last_log_time, self.last_log_step = now, state.global_step

        def on_save(self, args, state, control, **kwargs):
            metrics = {}
            for log in state.log_history:
                metrics.update(log)
            metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            metrics["step"] = state.global_step
            source = transformers.trainer_utils.get_last_checkpoint(args.output_dir)
            if rank == 0 and source is not None:
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copytree(source, Path(tmp) / "checkpoint")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)

    return ReportCheckpoints()


def build_dpo_trainer(job: dict[str, Any], rank: int, world: int, callbacks: list | None = None):
    """TRL's DPOTrainer (with the ledger) for one process of a `world`-process run.

    Shared by the Ray Train workers and by `bench/train_dpo.py`'s plain-TRL baseline, so
    both train exactly the same way. `job` holds the TrainConfig (`train`), the pairs
    folder, the policy folder, the storage and scratch paths, and the seed.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from pipelines.config import TrainConfig

    settings = TrainConfig.model_validate(job["train"])
    storage = Path(job["storage"])
    (storage / LEDGER).mkdir(parents=True, exist_ok=True)
    use_gpu = settings.gpus_per_worker > 0
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(storage / "tensorboard")  # read by transformers
    os.environ.update(job.get("env") or {})  # the MLflow run to log into (tracking.py)
    report_to = [name for name in job["train"]["report_to"] if name != "tensorboard" or job.get("tensorboard", True)]

    global_batch = settings.per_device_batch_size * world
    tokenizer = load_policy_tokenizer(job["policy"])
    train_set, eval_set, _ = load_pair_datasets(job["pairs"], settings.sources, tokenizer,
                                                settings.max_length, global_batch)
    bf16 = settings.bf16 if settings.bf16 is not None else bool(use_gpu and torch.cuda.is_bf16_supported())
    model = AutoModelForCausalLM.from_pretrained(
        job["policy"], trust_remote_code=False, use_safetensors=True,
        dtype=torch.bfloat16 if bf16 else torch.float32)
    peft_config = None
    if settings.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora.r, lora_alpha=settings.lora.alpha,
                                 lora_dropout=settings.lora.dropout, task_type="CAUSAL_LM",
                                 target_modules=settings.lora.target_modules)
    args = DPOConfig(
        output_dir=str(Path(job["scratch"]) / f"rank-{rank}"),
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        learning_rate=settings.learning_rate, beta=settings.beta,
        loss_type=settings.loss_type, loss_weights=settings.loss_weights,
        max_steps=settings.max_steps, num_train_epochs=settings.epochs,
        max_length=settings.max_length, precompute_ref_log_probs=settings.precompute_ref_log_probs,
        gradient_checkpointing=settings.gradient_checkpointing, bf16=bf16, use_cpu=not use_gpu,
        save_strategy="steps" if job.get("save", True) else "no", save_steps=settings.save_steps,
        save_total_limit=2, logging_steps=settings.logging_steps,
        report_to=report_to if rank == 0 else [],
        disable_tqdm=True, seed=job["seed"], data_seed=job["seed"], remove_unused_columns=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
        fsdp="full_shard auto_wrap" if settings.fsdp else "",
        fsdp_config={"use_orig_params": True} if settings.fsdp else None,
    )
    trainer = _ledger_trainer_class()(
        model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
        processing_class=tokenizer, peft_config=peft_config,
        # TRL cuts prompt + answer to max_length in its collator, and only in the one it builds
        # itself: this one is given the same settings.
        data_collator=_IndexCollator(DataCollatorForPreference(
            pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
            truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)),
        callbacks=callbacks or [])
    trainer.ledger_path = storage / LEDGER / f"rank-{rank}.jsonl"
    return trainer


def train_loop_per_worker(job: dict[str, Any]) -> None:
    """The Ray Train worker function. `job` carries paths and the TrainConfig as JSON."""
    import ray
    import ray.train
    import torch

    from pipelines.config import TrainConfig

    settings = TrainConfig.model_validate(job["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage = Path(job["storage"])
    torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    (storage / "nodes").mkdir(parents=True, exist_ok=True)   # where each rank ran, for the summary
    (storage / "nodes" / f"rank-{rank}").write_text(ray.get_runtime_context().get_node_id())
    trainer = build_dpo_trainer(job, rank, world, callbacks=[_report_callback(rank, world)])
    tokenizer, eval_set = trainer.processing_class, trainer.eval_dataset
    if job.get("fail_at_step") is not None:
        trainer.add_callback(_fail_once(int(job["fail_at_step"]), storage / "failed-once"))

    checkpoint = ray.train.get_checkpoint()
    resumed_from = _checkpoint_step(checkpoint)  # before training: old checkpoints get pruned
    started = time.time()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            output = trainer.train(resume_from_checkpoint=str(Path(folder) / "checkpoint"))
    else:
        output = trainer.train()
    train_seconds = time.time() - started
    final = {"train_" + k if not k.startswith("train") else k: v for k, v in output.metrics.items()}
    final["resumed_from_step"] = resumed_from
    if eval_set is not None:
        final.update(trainer.evaluate())
    export = storage / EXPORT
    sharded = trainer.is_fsdp_enabled   # train.fsdp on GPUs (on CPU the Trainer does not shard)
    if sharded:
        # The weights are sharded over the ranks: every rank takes part in gathering them
        # (a full state dict), and the Trainer writes it from rank 0 (safetensors).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(export))
    if rank == 0:
        if not sharded:
            to_save = trainer.model
            if settings.lora is not None:
                to_save = trainer.model.merge_and_unload()
            to_save.save_pretrained(export, safe_serialization=True)
        tokenizer.save_pretrained(export)
        final.update(global_step=trainer.state.global_step, train_wall_seconds=round(train_seconds, 3),
                     log_history=trainer.state.log_history)
        (storage / RESULT).write_text(json.dumps(final, indent=2, default=float))
    ray.train.report({k: v for k, v in final.items() if isinstance(v, (int, float))})


def _checkpoint_step(checkpoint) -> int | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / "checkpoint" / "trainer_state.json").read_text())
    return int(state["global_step"])


def _fail_once(step: int, marker: Path):
    """Test hook: the worker process dies at a step, once per run (a marker file remembers)."""
    from transformers import TrainerCallback

    class FailOnce(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and not marker.exists():
                marker.write_text(str(step))
                # A crash well after the last checkpoint: Ray Train's controller polls
                # workers for reports, and a report still unread when a worker dies
                # is lost (the retry would then start from an older checkpoint).
                time.sleep(3)
                os._exit(1)

    return FailOnce()


def read_ledger(storage: Path | str) -> list[dict[str, Any]]:
    """The micro-batches that count. A resumed attempt redoes the steps after its
    checkpoint, so for each (rank, step) only the latest attempt's records are kept."""
    by_step: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for path in sorted((Path(storage) / LEDGER).glob("rank-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            record = {**json.loads(line), "rank": rank}
            by_step.setdefault((rank, record["step"]), []).append(record)
    kept = []
    for records in by_step.values():
        latest = max(r["attempt"] for r in records)
        kept.extend(r for r in records if r["attempt"] == latest)
    return sorted(kept, key=lambda r: (r["step"], r["rank"]))


def steps_per_epoch(train_pairs: int, global_batch: int, accumulation: int) -> int:
    """Optimizer steps in one epoch, as transformers' Trainer counts them: a last, partial
    accumulation still makes a step (ceiling), at least one."""
    return max(1, math.ceil((train_pairs // global_batch) / accumulation))


def coverage(records: list[dict[str, Any]], train_pairs: int, steps_per_epoch: int) -> dict[str, Any]:
    """Per epoch: pairs seen, pairs repeated, pairs never seen (in a complete epoch)."""
    epochs: dict[int, list[int]] = {}
    for record in records:
        epochs.setdefault((record["step"] - 1) // steps_per_epoch, []).extend(record["pairs"])
    out = {}
    for epoch, seen in sorted(epochs.items()):
        counts: dict[int, int] = {}
        for index in seen:
            counts[index] = counts.get(index, 0) + 1
        out[epoch] = {"seen": len(counts), "repeated": sum(1 for c in counts.values() if c > 1),
                      "missing": train_pairs - len(counts)}
    return out
