"""The warm-start policy for CPU experiments: a tiny Llama fine-tuned (SFT) on synthetic
answers that cover every property value, in the prompts the pipeline uses it with, rendered
by `actors.prompts`: the policy prompt (base system prompt, persona block if any, request)
and the Rewriter's chat layout (`REWRITE_PROMPT`).

All user words come from the `dev` phrasing family (sim/phrasings.py): the experiment's
users speak the `eval` family, which the warm-start never sees.

Policy chats: half of the requests carry one constraint phrase (an `ask` clause) and their
answers obey it, so the policy learns some instruction following that feedback can exploit;
the other answers get uniformly random property values, so its unconstrained answers vary
along every property. A share of the chats carry a persona (built by the extractive backend
from a synthetic history, `synthetic_persona`) whose stated values the answer has more often
than chance (`persona_follow`): a partial persona-guided inference, as an instruct LLM has,
for RLHI's persona-DPO to strengthen or not. Rewrite chats (`rewrite_share`): a request, an
answer missing one value, the user's re-attempt or correction naming it, and the answer
with that value fixed: what an instruct LLM does when a user replies. `rlhi sim diagnose`
measures all three roles against chance.

A plain torch loop (one file, top to bottom) rather than a trainer, deterministic (fixed
threads, seeded data order, deterministic kernels). Built once and cached under
`<model cache>/sim-warmstart-<hash>`, where the hash covers the recipe (`RECIPE`, the
training code) and the training chats themselves, so an edit that leaves the data the same
(a docstring, a refactor of the simulator) reuses the cached model.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import random
import shutil
from functools import lru_cache
from pathlib import Path

from actors import persona_extractive, prompts
from actors.models import model_cache_dir
from actors.rewriter import rewrite_messages
from sim import answers, feedback, requests
from sim.phrasings import load_bank
from sim.profiles import PROPERTIES, TOPICS

FAMILY = "dev"  # the phrasings the warm-start learns from; never the evaluation family

# Every knob of the recipe, named once; part of the cache key. Following a constraint is
# what takes training: at 480 steps the policy followed a request's phrase no more often
# than chance; at 1500 steps (lr 6e-3), 73% of the time.
RECIPE = {"examples": 4096, "constrained_share": 0.5, "persona_share": 0.5, "persona_follow": 0.6,
          "vocab_size": 1024, "hidden_size": 128, "layers": 2, "heads": 4, "head_dim": 32,
          "rewrite_share": 0.5, "correction_share": 0.65,
          "steps": 3000, "batch_size": 16, "learning_rate": 6e-3, "max_tokens": 768, "seed": 0, "threads": 2}
# The Rewriter layout the warm-start is trained on and the simulation's rewriter uses.
REWRITE_PROMPT = "chat"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def training_chats() -> tuple[tuple[dict, ...], ...]:
    """The SFT chats of the recipe (deterministic: seeded)."""
    return _chats(json.dumps(RECIPE, sort_keys=True))


@lru_cache(maxsize=2)
def _chats(recipe: str) -> tuple[tuple[dict, ...], ...]:
    settings = json.loads(recipe)
    return tuple(tuple(chat) for chat in sft_examples(settings["examples"], random.Random(settings["seed"])))


def recipe_hash() -> str:
    """The cache key: the recipe, the training code, the chat template and the training
    chats (the data-making code enters only through the data it makes)."""
    code = "".join(inspect.getsource(f) for f in (_tokenizer, _encode, build_warmstart))
    blob = json.dumps([RECIPE, REWRITE_PROMPT, CHAT_TEMPLATE, code, training_chats()], sort_keys=True)
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
    """`n` chats whose last message is the target answer: a share `rewrite_share` in the
    Rewriter's chat layout (`rewrite_example`), the others in the policy prompt
    (`policy_example`)."""
    combos = answers.all_value_combinations()
    chats = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        request = requests.make_request(topic, rng)
        values = dict(combos[i % len(combos)])
        if rng.random() < RECIPE["rewrite_share"]:
            chats.append(rewrite_example(topic, request, values, rng))
        else:
            chats.append(policy_example(topic, request, values, rng))
    return chats


def rewrite_example(topic: str, request: str, values: dict[str, str], rng: random.Random) -> list[dict]:
    """One chat in the Rewriter's chat layout (`REWRITE_PROMPT`): a request, an answer with
    `values` but one property's, the user's feedback naming the value wanted (a re-attempt or,
    at `correction_share`, a correction), and the answer again with that one value fixed."""
    prop = rng.choice(sorted(PROPERTIES))
    missed = values | {prop: rng.choice([v for v in PROPERTIES[prop] if v != values[prop]])}
    kind = "correction" if rng.random() < RECIPE["correction_share"] else "reattempt"
    message = feedback.feedback_message(kind, request, {prop: values[prop]}, missed, rng, load_bank(FAMILY)).text
    role, turns, fields = rewrite_messages(REWRITE_PROMPT, None, [{"role": "user", "content": request}],
                                           answers.write_answer(topic, missed, rng), message)
    return [*prompts.render(role, None, turns, **fields),
            {"role": "assistant", "content": answers.write_answer(topic, values, rng)}]


def synthetic_persona(wanted: dict[str, str], rng: random.Random, family: str = FAMILY) -> str:
    """A persona as the pipeline builds it (`persona_extractive.extractive_persona`) from a
    short synthetic history: one conversation per wanted value, whose feedback asks for it,
    and up to two without feedback."""
    history = []
    for prop, value in wanted.items():
        topic = rng.choice(TOPICS)
        request = requests.make_request(topic, rng)
        missed = {prop: rng.choice([v for v in PROPERTIES[prop] if v != value])}
        message = feedback.feedback_message(rng.choice(("reattempt", "correction")), request, {prop: value},
                                            missed, rng, load_bank(family)).text
        history.append({"turns": [{"role": "user", "content": request}, {"role": "assistant", "content": ""},
                                  {"role": "user", "content": message}],
                        "language": "English", "feedback": [message]})
    for _ in range(rng.randint(0, 2)):
        history.append({"turns": [{"role": "user", "content": requests.make_request(rng.choice(TOPICS), rng)}],
                        "language": "English", "feedback": []})
    rng.shuffle(history)
    return persona_extractive.extractive_persona(history)


def policy_example(topic: str, request: str, values: dict[str, str], rng: random.Random) -> list[dict]:
    """One chat in the policy prompt. Some requests end with a constraint phrase the answer
    obeys; some carry a persona whose stated preferences the answer meets part of the time
    (`persona_follow` per stated property, else whatever `values` has)."""
    persona = None
    if rng.random() < RECIPE["persona_share"]:
        props = rng.sample(sorted(PROPERTIES), k=rng.randint(1, 3))
        wanted = {p: rng.choice(PROPERTIES[p]) for p in props}
        persona = synthetic_persona(wanted, rng)
        values |= {p: v for p, v in wanted.items() if rng.random() < RECIPE["persona_follow"]}
    if rng.random() < RECIPE["constrained_share"]:
        prop = rng.choice(sorted(PROPERTIES))
        values[prop] = rng.choice(PROPERTIES[prop])
        request = f"{request} {rng.choice(load_bank(FAMILY).ask[values[prop]])}."
    rendered = prompts.render("policy", persona, [{"role": "user", "content": request}])
    return [*rendered, {"role": "assistant", "content": answers.write_answer(topic, values, rng)}]


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
    prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(chat, tokenize=False).rstrip("\n")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"][: RECIPE["max_tokens"]]
    return ids, ([-100] * len(p_ids) + ids[len(p_ids):])[: len(ids)]


def build_warmstart(out: Path) -> Path:
    """Build the tokenizer, fine-tune a tiny Llama on the SFT chats, save to `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(RECIPE["threads"])
    torch.use_deterministic_algorithms(True)
    rng = random.Random(RECIPE["seed"] + 1)  # the data order; the chats have their own stream
    chats = [list(chat) for chat in training_chats()]
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
