"""The warm-start policy for CPU experiments: a tiny Llama briefly fine-tuned (SFT) on
synthetic answers that cover every property value.

Half of the SFT requests carry one constraint phrase (`feedback.ASK`) and their answers obey
it, so the policy learns a little instruction following that feedback can exploit; the other
half get answers with uniformly random property values, so its unconstrained answers vary
along every property. A plain torch loop (one file, top to bottom) rather than a trainer:
the model is a few hundred thousand parameters and trains in well under a minute.

Built once and cached under `<model cache>/sim-warmstart-<hash>`, where the hash covers the
recipe (`RECIPE` and the source of the data modules), so a changed recipe builds afresh.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import random
import shutil
from pathlib import Path

from actors.models import model_cache_dir
from pipelines.sim import answers, feedback, requests
from pipelines.sim.profiles import PROPERTIES, TOPICS

# Every knob of the recipe, named once; part of the cache key.
RECIPE = {"examples": 1536, "constrained_share": 0.5, "vocab_size": 1024, "hidden_size": 128,
          "layers": 2, "heads": 4, "head_dim": 32, "steps": 240, "batch_size": 16,
          "learning_rate": 3e-3, "max_tokens": 320, "seed": 0}
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def recipe_hash() -> str:
    """Hash of the recipe and of the modules that make its data (the cache key)."""
    blob = json.dumps(RECIPE, sort_keys=True) + "".join(
        inspect.getsource(m) for m in (answers, feedback, requests))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warmstart_path() -> Path:
    """Where the warm-start model for the current recipe lives (built or not)."""
    return model_cache_dir() / f"sim-warmstart-{recipe_hash()}"


def ensure_warmstart(log=print) -> Path:
    """The cached warm-start model's folder, building it first if it is missing."""
    path = warmstart_path()
    if (path / "config.json").exists():
        return path
    log(f"building the warm-start policy (once) into {path} ...")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_warmstart(tmp)
    tmp.rename(path)  # atomic: a half-built folder is never mistaken for a model
    return path


def sft_examples(n: int, rng: random.Random) -> list[list[dict]]:
    """`n` single-turn chats (request, synthetic answer) covering every property value."""
    combos = answers.all_value_combinations()
    chats = []
    for i in range(n):
        values = dict(combos[i % len(combos)])
        topic = rng.choice(TOPICS)
        request = requests.make_request(topic, rng)
        if rng.random() < RECIPE["constrained_share"]:
            prop = rng.choice(sorted(PROPERTIES))
            values[prop] = rng.choice(PROPERTIES[prop])
            request = f"{request} {rng.choice(feedback.ASK[values[prop]])}."
        chats.append([{"role": "user", "content": request},
                      {"role": "assistant", "content": answers.write_answer(topic, values, rng)}])
    return chats


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"], special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _encode(tok, chat: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the chat and labels that train on the answer (and its end token) only."""
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(chat, tokenize=False).rstrip("\n")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][: RECIPE["max_tokens"]]
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def build_warmstart(out: Path) -> Path:
    """Build the tokenizer, fine-tune a tiny Llama on the SFT chats, save to `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    rng = random.Random(RECIPE["seed"])
    chats = sft_examples(RECIPE["examples"], rng)
    tok = _tokenizer([m["content"] for c in chats for m in c]
                     + list(requests.wildchat_first_turns()))
    encoded = [_encode(tok, c) for c in chats]
    torch.manual_seed(RECIPE["seed"])
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=RECIPE["hidden_size"],
        intermediate_size=2 * RECIPE["hidden_size"], num_hidden_layers=RECIPE["layers"],
        num_attention_heads=RECIPE["heads"], num_key_value_heads=RECIPE["heads"],
        head_dim=RECIPE["head_dim"], max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=RECIPE["learning_rate"])
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, RECIPE["learning_rate"], RECIPE["steps"])
    model.train()
    for step in range(RECIPE["steps"]):
        batch = rng.sample(encoded, RECIPE["batch_size"])
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(RECIPE | {"final_loss": round(loss.item(), 4)}))
    return out
