"""Tiny models built deterministically in code: test fixtures, never defaults.

Llama architecture (hidden 64, 2 layers, 2 heads of head_dim 32: vLLM needs head_dim >= 32),
a ByteLevel BPE tokenizer trained with `tokenizers` on a fixed corpus, and a chat template
that, like SmolLM2's, injects its own default system prompt when none is given. Weights are
random but seeded, so every run builds byte-identical models; they exercise code paths, not
quality. Build once per test session (about a second) with `build_all(folder)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# SmolLM2's template with a different default system prompt: tests can tell whether a
# template default sneaked into a rendered prompt.
TINY_DEFAULT_SYSTEM = "You are Tiny, a default assistant nobody asked for."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + TINY_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Write a short story about a robot. Please make it longer and more detailed.",
    "No, that is wrong. Use Python 3 instead. Thanks, that works!",
    "You are a helpful assistant. About this user: likes concise answers.",
    "positive negative correction complaint clarification new_request reattempt_feedback",
    "Yes No A B answer conversation user assistant system persona candidate",
    "def main(): print('hello world') # code with numbers 0123456789",
]


@dataclass(frozen=True)
class TinyModels:
    """Folders of the tiny fixtures, each loadable with `from_pretrained`."""

    causal_lm: Path          # LlamaForCausalLM + tokenizer with chat template
    reward_model: Path       # LlamaForSequenceClassification, num_labels=1 (a "classifier" RM)
    base_model: Path         # LlamaModel only: loading it with a head must fail
    encoder_reward: Path     # BertForSequenceClassification, num_labels=1 (a "trained" RM)


def build_tokenizer():
    """A 512-token ByteLevel BPE tokenizer with chat special tokens and the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama_config(tokenizer, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=4096, tie_word_embeddings=True,
        # Wider than the default 0.02 init: near-uniform logits make greedy decoding repeat
        # one token, which would let batching and stop-string tests pass vacuously.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_all(root: Path) -> TinyModels:
    """Build every tiny fixture under `root` (deterministic: seeded weights)."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, LlamaForCausalLM,
                              LlamaForSequenceClassification, LlamaModel)

    tok = build_tokenizer()
    torch.manual_seed(0)
    causal = _save(LlamaForCausalLM(_llama_config(tok)), tok, root / "tiny-llama")
    torch.manual_seed(1)
    reward = _save(LlamaForSequenceClassification(_llama_config(tok, num_labels=1)), tok,
                   root / "tiny-llama-rm")
    torch.manual_seed(2)
    base = _save(LlamaModel(_llama_config(tok)), tok, root / "tiny-llama-base")
    torch.manual_seed(3)
    bert_cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=128,
                          max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                          num_labels=1)
    encoder = _save(BertForSequenceClassification(bert_cfg), tok, root / "tiny-bert-rm")
    return TinyModels(causal, reward, base, encoder)


class RecordingEngine:
    """A real engine that also keeps every prompt it is given (for tests asserting on
    what a role rendered); everything else passes through."""

    def __init__(self, inner) -> None:
        self.inner, self.prompts = inner, []

    def generate(self, prompts, params):
        self.prompts += [list(p) for p in prompts]
        return self.inner.generate(prompts, params)

    def score_continuations(self, prompts, continuations):
        self.prompts += [list(p) for p in prompts]
        return self.inner.score_continuations(prompts, continuations)

    def __getattr__(self, name):
        return getattr(self.inner, name)
