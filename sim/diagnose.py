"""Can the simulation's model do what the experiment needs of it? Three checks, each against
its own baseline measured in the same run.

    rlhi sim diagnose [--model DIR] [--n N] [--seed S] [--family dev|eval] [--json]

RLHI can only move a policy toward what users want if its roles can act on what users say.
For every property value (`profiles.PROPERTIES`) the model is asked, `n` times in all:
- **policy**: a request with one constraint phrase (an `ask` clause), in the policy prompt;
- **rewriter**: an answer missing one value and the user's feedback naming it, through
  `actors.rewriter.Rewriter` in the simulation's prompt layout (`warmstart.REWRITE_PROMPT`,
  `chat`; `--rewrite-prompt quoted` measures the other);
- **persona**: a request in the policy prompt with a persona whose stated preferences
  include the value (the persona-guided inference RLHI's policy is asked to do).

Each reports `followed`: the share of answers that have the asked value (`profiles.measure`),
`chance`: the share with it when nothing asks for it (the same requests, unconstrained, in
the policy prompt without persona), and `followed_ratio` = followed / chance. A ratio near 1
means the role ignores what it is told, and no pipeline built on it can show an effect.
"""
from __future__ import annotations

import argparse
import json
import random
from typing import Any

from actors.engines import GenerationEngine, make_engine
from actors.models import ModelSpec
from actors.policy_sampler import PolicySampler
from actors.rewriter import Rewriter
from sim import answers, feedback, requests
from sim.phrasings import load_bank
from sim.profiles import PROPERTIES, TOPICS, measure
from sim.warmstart import REWRITE_PROMPT, ensure_warmstart, synthetic_persona

CHECKS = ("policy", "rewriter", "persona")


def _items(n: int, seed: int, family: str) -> list[dict[str, Any]]:
    """`n` (property, value, request, misses-it answer, feedback, persona) cases, the user's
    words from phrasing family `family`."""
    rng = random.Random(f"diagnose/{seed}")
    bank = load_bank(family)
    combos = answers.all_value_combinations()
    items = []
    for i in range(n):
        prop = sorted(PROPERTIES)[i % len(PROPERTIES)]
        value = rng.choice(PROPERTIES[prop])
        topic = rng.choice(TOPICS)
        request = requests.make_request(topic, rng)
        missed = dict(rng.choice(combos)) | {prop: rng.choice([v for v in PROPERTIES[prop] if v != value])}
        kind = rng.choice(("reattempt", "correction"))
        items.append({"prop": prop, "value": value, "request": request,
                      "ask": f"{request} {rng.choice(bank.ask[value])}.",
                      "answer": answers.write_answer(topic, missed, rng),
                      "feedback": feedback.feedback_message(kind, request, {prop: value}, missed, rng, bank).text,
                      "persona": synthetic_persona({prop: value}, rng, family)})
    return items


def _share(items: list[dict[str, Any]], texts: list[str]) -> float:
    return sum(measure(t)[it["prop"]] == it["value"] for it, t in zip(items, texts)) / len(items)


def diagnose(engine: GenerationEngine, *, n: int = 110, seed: int = 0, max_new_tokens: int = 160,
             temperature: float = 0.6, rewrite_prompt: str = REWRITE_PROMPT, family: str = "eval") -> dict[str, Any]:
    """The three checks on `engine`; returns {check: {followed, chance, followed_ratio}, n}."""
    spec = ModelSpec(id="diagnose", engine="transformers", max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=0.9, seed=seed, rewrite_prompt=rewrite_prompt)
    policy = PolicySampler(spec, 1, engine=engine)
    rewriter = Rewriter(spec, engine=engine)
    items = _items(n, seed, family)

    def answer(personas: list[str | None], texts: list[str]) -> list[str]:
        out = policy.sample_batch(personas, [[{"role": "user", "content": t}] for t in texts])
        return [s.candidates[0] for s in out]

    chance = _share(items, answer([None] * n, [it["request"] for it in items]))
    followed = {
        "policy": _share(items, answer([None] * n, [it["ask"] for it in items])),
        "rewriter": _share(items, [r.text for r in rewriter.rewrite_batch(
            [None] * n, [[{"role": "user", "content": it["request"]}] for it in items],
            [it["answer"] for it in items], [it["feedback"] for it in items])]),
        "persona": _share(items, answer([it["persona"] for it in items], [it["request"] for it in items])),
    }
    return {"n": n, "family": family, **{check: {"followed": round(followed[check], 3), "chance": round(chance, 3),
                               "followed_ratio": round(followed[check] / max(chance, 1e-9), 3)}
                       for check in CHECKS}}


def diagnose_model(model: str, *, n: int = 110, seed: int = 0, rewrite_prompt: str = REWRITE_PROMPT,
                   family: str = "eval") -> dict[str, Any]:
    """`diagnose` on a model folder, loaded once for all three roles."""
    engine = make_engine(ModelSpec(id=model, engine="transformers", max_new_tokens=160, seed=seed,
                                   batch_size=64))
    return diagnose(engine, n=n, seed=seed, rewrite_prompt=rewrite_prompt, family=family)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhi sim diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the warm-start policy)")
    parser.add_argument("--n", type=int, default=110, help="cases per check (default 110)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rewrite-prompt", choices=("quoted", "chat"), default=REWRITE_PROMPT,
                        help=f"the rewriter's prompt layout (default {REWRITE_PROMPT}, the simulation's)")
    parser.add_argument("--family", choices=("eval", "dev"), default="dev",
                        help="phrasing family of the requests' constraints and the feedback (default dev: "
                             "diagnosing is development work; the experiment reports eval itself)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = parser.parse_args(argv)
    model = args.model or str(ensure_warmstart())
    result = diagnose_model(model, n=args.n, seed=args.seed, rewrite_prompt=args.rewrite_prompt,
                            family=args.family)
    for check in CHECKS:
        r = result[check]
        print(f"{check:9s} followed {r['followed']:.3f}  chance {r['chance']:.3f}  ratio {r['followed_ratio']:.2f}")
    if args.json:
        print(json.dumps(result | {"model": model, "rewrite_prompt": args.rewrite_prompt}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
