"""The reward-score interface: one scalar per sequence from a sequence-classification model.

Two kinds of reward model sit behind it:
- decoder reward models (Skywork-Reward, Athene-RM style: a causal LM with a one-output
  head) read a chat through their chat template and score its last token;
- encoder reward models (this project's Bradley-Terry MiniLM) read a (prompt, answer) text
  pair, as BERT-style models do.

transformers' decoder classifiers pool the last token that is not the pad token. When a
tokenizer pads with its EOS (or BOS) token, a sequence ending in EOS would be pooled one
token early, so such models are scored one sequence at a time through `inputs_embeds`,
which pools the true last position.

Scoring pads each forward pass to its longest row, so rows are scored in length-sorted
buckets of at most `max_bucket_tokens` padded tokens: padding is then a few tokens per row
rather than the spread of the whole batch. Tokenization (`encode_*`) is separate from
scoring (`score_encoded`), so a server can tokenize each request as it arrives and batch
only the model call (serve/replicas.py).
"""
from __future__ import annotations

from typing import Any, Sequence

from actors.engines.base import Message
from actors.engines.transformers_engine import chat_token_ids
from actors.models import ModelSpec, load_model, load_tokenizer, pick_device

Row = dict[str, list[int]]
"""One tokenized sequence: `input_ids` (and `token_type_ids`, `attention_mask` for pairs)."""

MAX_BUCKET_TOKENS = 4096
"""Padded tokens per forward pass. On CPU the cost per token is flat from about 2k tokens
per pass (MiniLM on 2 cores: 63 pairs/s of 110 tokens at 16 rows, 63 at 128), so smaller
buckets cost nothing and waste less padding; a GPU wants more (`max_bucket_tokens`)."""


class SequenceRewardScorer:
    """`AutoModelForSequenceClassification` with `num_labels=1`, on CPU or one GPU."""

    def __init__(self, spec: ModelSpec, model: Any = None, tokenizer: Any = None,
                 max_bucket_tokens: int = MAX_BUCKET_TOKENS) -> None:
        from transformers import AutoModelForSequenceClassification

        self.spec = spec
        self.max_bucket_tokens = max_bucket_tokens
        self.device = pick_device(spec)
        self.tokenizer = tokenizer or load_tokenizer(spec)
        self.model = model or load_model(AutoModelForSequenceClassification, spec, self.device)
        if self.model.config.num_labels != 1:
            raise ValueError(f"model {spec.id!r} has {self.model.config.num_labels} outputs; "
                             "a reward model has exactly one (num_labels=1)")
        self.max_context_tokens = spec.max_context_tokens or int(
            getattr(self.model.config, "max_position_embeddings", 512))
        pad, tok = self.tokenizer.pad_token_id, self.tokenizer
        self.pad_is_distinct = pad is not None and pad not in (tok.eos_token_id, tok.bos_token_id)
        if self.pad_is_distinct:
            self.model.config.pad_token_id = pad  # the pooling reads it from the config

    @property
    def reads_chats(self) -> bool:
        """True for a decoder RM with a chat template; False for an encoder on text pairs."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def count_chat_tokens(self, messages: Sequence[Message]) -> int:
        return len(chat_token_ids(self.tokenizer, messages, add_generation_prompt=False))

    def count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chats(self, chats: Sequence[Sequence[Message]]) -> list[Row]:
        """Token rows of complete chats (the last message is the answer being scored)."""
        return [{"input_ids": chat_token_ids(self.tokenizer, c, add_generation_prompt=False)}
                for c in chats]

    def encode_text_pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Row]:
        """Token rows of (prompt text, answer text) pairs; overflow cuts the answer's end."""
        return [dict(self.tokenizer(prompt, answer, truncation="only_second",
                                    max_length=self.max_context_tokens))
                for prompt, answer in zip(prompts, answers, strict=True)]

    def score_chats(self, chats: Sequence[Sequence[Message]]) -> list[float]:
        """Reward of each complete chat (its last message is the answer being scored)."""
        return self.score_encoded(self.encode_chats(chats))

    def score_text_pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Reward of each (prompt text, answer text) pair; overflow cuts the answer's end."""
        return self.score_encoded(self.encode_text_pairs(prompts, answers))

    def score_encoded(self, rows: Sequence[Row]) -> list[float]:
        """Reward of each token row, in order, scored in length-sorted buckets."""
        scores = [0.0] * len(rows)
        for bucket in self.buckets([len(r["input_ids"]) for r in rows]):
            for i, score in zip(bucket, self._score([rows[i] for i in bucket]), strict=True):
                scores[i] = score
        return scores

    def buckets(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices grouped for one forward pass each: sorted by length, a bucket closes
        before its rows x longest row would pass `max_bucket_tokens` or its rows
        `spec.batch_size` (a longer row still goes alone). Without a distinct pad token
        every row goes alone (see the module docstring)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        limit = self.spec.batch_size if self.pad_is_distinct else 1
        out: list[list[int]] = []
        for i in order:  # ascending, so lengths[i] is the bucket's longest row
            if out and len(out[-1]) < limit and \
                    (len(out[-1]) + 1) * lengths[i] <= self.max_bucket_tokens:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def _score(self, rows: list[Row]) -> list[float]:
        """One forward pass over `rows` (one row when the pad token is not distinct)."""
        import torch

        batch = self.tokenizer.pad(rows, padding=True, return_tensors="pt",
                                   padding_side="right")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            if self.pad_is_distinct:
                logits = self.model(**batch).logits
            else:  # one unpadded sequence: pool its true last token
                embeds = self.model.get_input_embeddings()(batch.pop("input_ids"))
                logits = self.model(inputs_embeds=embeds, **batch).logits
        return [float(x) for x in logits[:, 0].float().cpu()]
