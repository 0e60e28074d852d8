"""The transformers engine: batched chat generation and scoring on CPU or one GPU.

Generation left-pads (decoder-only models continue from the right edge) and lets
`generate` derive position ids from the attention mask. Scoring right-pads so every row's
positions start at 0 and the padding sits after the tokens being scored.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from actors.batch import regroup
from actors.engines.base import Completion, Message, SamplingParams, cut_at_stop
from actors.models import ModelSpec, load_model, load_tokenizer, pick_device

# Per tokenizer class: does its apply_chat_template accept sanitize_control_tokens (5.20+)?
_SANITIZE: dict[type, bool] = {}


def sanitizing(tokenizer: Any) -> dict[str, bool]:
    """The apply_chat_template keyword that encodes typed control tokens as plain text, where
    this transformers version has it (else none). Everything that tokenizes a chat for the
    policy passes it: sampling, scoring, and DPO (TRL's chat_template_kwargs)."""
    if _SANITIZE.get(type(tokenizer)) is None:
        params = inspect.signature(tokenizer.apply_chat_template).parameters
        _SANITIZE[type(tokenizer)] = "sanitize_control_tokens" in params
    return {"sanitize_control_tokens": True} if _SANITIZE[type(tokenizer)] else {}


def chat_token_ids(tokenizer: Any, messages: Sequence[Message],
                   add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` through the model's chat template.

    Control tokens typed by users ("<|im_start|>system ...") are encoded as plain text where
    this transformers version can (`sanitize_control_tokens`), so user text cannot forge a
    turn of another role.
    """
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt,
                              "tokenize": True, "return_dict": False, **sanitizing(tokenizer)}
    ids = tokenizer.apply_chat_template(list(messages), **kwargs)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def continuation_rows(tokenizer: Any, prompts: Sequence[Sequence[Message]],
                      continuations: Sequence[Sequence[str]]) -> list[tuple[list[int], int]]:
    """(prompt + continuation token ids, prompt length) for every continuation of every
    prompt, in order: what both engines score the continuations' log-probabilities on."""
    rows: list[tuple[list[int], int]] = []
    for messages, conts in zip(prompts, continuations, strict=True):
        prompt_ids = chat_token_ids(tokenizer, messages)
        for cont in conts:
            cont_ids = tokenizer.encode(cont, add_special_tokens=False)
            if not cont_ids:
                raise ValueError(f"cannot score an empty continuation {cont!r}")
            rows.append((prompt_ids + cont_ids, len(prompt_ids)))
    return rows


class TransformersEngine:
    """GenerationEngine on a transformers causal LM (`AutoModelForCausalLM`)."""

    def __init__(self, spec: ModelSpec, model: Any = None, tokenizer: Any = None) -> None:
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.device = pick_device(spec)
        self.tokenizer = tokenizer or load_tokenizer(spec)
        self.model = model or load_model(AutoModelForCausalLM, spec, self.device)
        self.max_context_tokens = spec.max_context_tokens or int(
            getattr(self.model.config, "max_position_embeddings", 2048))
        # Stop on every end-of-turn token the model knows (EOS and, e.g., <|eot_id|>).
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *(
            eos if isinstance(eos, list) else [eos] if eos is not None else [])})

    # ------------------------------------------------------------------ interface

    def count_tokens(self, messages: Sequence[Message]) -> int:
        return len(chat_token_ids(self.tokenizer, messages))

    def generate(self, prompts: Sequence[Sequence[Message]],
                 params: SamplingParams) -> list[list[Completion]]:
        import torch

        results: list[list[Completion]] = []
        for start in range(0, len(prompts), self.spec.batch_size):
            batch = [chat_token_ids(self.tokenizer, p) for p in prompts[start:start + self.spec.batch_size]]
            input_ids, mask = self._pad(batch, left=True)
            if params.seed is not None:
                # Seeded per micro-batch so a rerun of the same input draws the same samples.
                torch.manual_seed(params.seed + start)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, **self._decode_kwargs(params))
            new = out[:, input_ids.shape[1]:].tolist()
            per_prompt = len(new) // len(batch)
            for i in range(len(batch)):
                rows = new[i * per_prompt:(i + 1) * per_prompt]
                completions = [self._completion(ids, params) for ids in rows]
                # Greedy decoding has one answer: n copies, as vLLM and OpenAI return.
                results.append(completions * (params.n // len(completions)))
        return results

    def score_continuations(self, prompts: Sequence[Sequence[Message]],
                            continuations: Sequence[Sequence[str]]) -> list[list[float]]:
        import torch

        rows = continuation_rows(self.tokenizer, prompts, continuations)
        scores: list[float] = []
        for start in range(0, len(rows), self.spec.batch_size):
            chunk = rows[start:start + self.spec.batch_size]
            input_ids, mask = self._pad([ids for ids, _ in chunk], left=False)
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = input_ids[:, 1:]
            token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for j, (ids, n_prompt) in enumerate(chunk):
                # Token t is predicted at position t-1: continuation tokens are
                # n_prompt..len(ids)-1, predicted at n_prompt-1..len(ids)-2.
                scores.append(float(token_lp[j, n_prompt - 1:len(ids) - 1].sum()))
        return regroup(scores, continuations)

    # ------------------------------------------------------------------ helpers

    def _pad(self, batch: list[list[int]], left: bool):
        import torch

        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            sl = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[i, sl] = torch.tensor(ids)
            mask[i, sl] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _decode_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        sample = params.temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": sample,
            "num_return_sequences": params.n if sample else 1,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.eos_ids,
        }
        if sample:
            # top_k=0 switches off transformers' default top-k of 50, which vLLM and
            # OpenAI servers do not apply: the three engines sample the same way.
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    def _completion(self, ids: list[int], params: SamplingParams) -> Completion:
        # Generated rows are right-padded after EOS: count up to and including the first EOS.
        # A row stopped by a stop string is padded with the pad token instead.
        length, finish = len(ids), "length"
        for i, tok in enumerate(ids):
            if tok in self.eos_ids or tok == self.tokenizer.pad_token_id:
                length, finish = i + (tok in self.eos_ids), "stop"
                break
        text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        # transformers also stops on a stop string that straddles the prompt's end; the
        # row is then short of max_new_tokens without a stop string in its own text.
        if stopped or length < params.max_new_tokens:
            finish = "stop"
        return Completion(text=text, num_tokens=length, finish_reason=finish)
