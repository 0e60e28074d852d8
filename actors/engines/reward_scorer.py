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
"""
from __future__ import annotations

from typing import Any, Sequence

from actors.engines.base import Message
from actors.engines.transformers_engine import chat_token_ids
from actors.models import ModelSpec, load_model, load_tokenizer, pick_device


class SequenceRewardScorer:
    """`AutoModelForSequenceClassification` with `num_labels=1`, on CPU or one GPU."""

    def __init__(self, spec: ModelSpec, model: Any = None, tokenizer: Any = None) -> None:
        from transformers import AutoModelForSequenceClassification

        self.spec = spec
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

    def score_chats(self, chats: Sequence[Sequence[Message]]) -> list[float]:
        """Reward of each complete chat (its last message is the answer being scored)."""
        rows = [chat_token_ids(self.tokenizer, c, add_generation_prompt=False) for c in chats]
        return self._score([{"input_ids": ids} for ids in rows])

    def score_text_pairs(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Reward of each (prompt text, answer text) pair; overflow cuts the answer's end."""
        rows = []
        for prompt, answer in zip(prompts, answers, strict=True):
            enc = self.tokenizer(prompt, answer, truncation="only_second",
                                 max_length=self.max_context_tokens)
            rows.append(dict(enc))
        return self._score(rows)

    def _score(self, rows: list[dict[str, list[int]]]) -> list[float]:
        import torch

        scores: list[float] = []
        step = self.spec.batch_size if self.pad_is_distinct else 1
        for start in range(0, len(rows), step):
            batch = self.tokenizer.pad(rows[start:start + step], padding=True,
                                       return_tensors="pt", padding_side="right")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                if self.pad_is_distinct:
                    logits = self.model(**batch).logits
                else:  # one unpadded sequence: pool its true last token
                    embeds = self.model.get_input_embeddings()(batch.pop("input_ids"))
                    logits = self.model(inputs_embeds=embeds, **batch).logits
            scores.extend(float(x) for x in logits[:, 0].float().cpu())
        return scores
