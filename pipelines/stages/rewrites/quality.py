"""The rewrites quality filter: which (rewrite, rejected) pairs become training signal.

The paper (Jin et al. 2025) finds filtering rewrites essential: a rewrite that is empty,
a copy of the rejected answer, wildly longer or shorter, or not actually better teaches
the policy nothing or the wrong thing. Each check is a plain function; `cheap_reason`
runs the model-free ones in a fixed order (first failing reason wins, so every dropped
pair is counted once), and `judge_margins` asks the judge only about pairs that passed.

Reasons, in the order they are checked:
    empty                       the rewrite is blank
    truncated                   the rewriter hit its token limit: as chosen, a cut answer
                                would teach the policy to stop mid-answer
    identical                   same text as the rejected answer, whitespace aside
    refusal_to_compliance       the rejected answer refuses and the rewrite complies: a user
                                re-asking after a refusal is a jailbreak attempt, not feedback
    too_short                   rewrite or rejected answer under min_tokens
    too_long                    rewrite over max_tokens
    length_ratio                one more than max_length_ratio times the other's length
    identical_after_truncation  same first truncate_tokens tokens (training cuts them equal)
    below_margin                the judge's P(rewrite better) - 0.5 is under margin
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from pipelines.config import QualityFilterConfig

Tokenize = Callable[[str], Sequence[int]]

REASONS = ("empty", "truncated", "identical", "refusal_to_compliance", "too_short", "too_long",
           "length_ratio", "identical_after_truncation", "below_margin")

# Refusals as assistants phrase them (OpenAI-era WildChat answers and instruct models).
# Only an answer's opening is searched: a refusal comes first, while a long helpful answer
# may mention "I can't" further down. Apostrophes are normalised before matching.
_CANT = r"(?:can ?not|can't|won't|will not|am not able to|'m not able to|am unable to|'m unable to)"
REFUSAL_PATTERNS = (
    rf"\bI(?:'m| am) (?:sorry|afraid)\b[^.!?\n]{{0,40}}\bI {_CANT}",       # I'm sorry, but I can't ...
    rf"\bsorry,? (?:but )?I {_CANT}",
    rf"^\s*I {_CANT} (?:help|assist|provide|comply|fulfil|fulfill|create|generate|write|"
    r"produce|do that|engage|support|continue|answer)",                   # opens with "I can't help"
    rf"\bas an AI(?: language model| assistant)?,? I {_CANT}",
    r"\bas an AI(?: language model| assistant)?,? I (?:don't|do not) (?:create|generate|"
    r"produce|engage|provide|support)",
    r"\bI must (?:respectfully )?(?:decline|refuse)\b",
    r"\b(?:this|that|your) request (?:goes against|violates|is against)\b",
    r"\bagainst (?:my|OpenAI's|the) (?:guidelines|policies|content polic(?:y|ies)|use[- ]case polic(?:y|ies))",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE | re.MULTILINE)
REFUSAL_WINDOW = 300  # characters of an answer's opening searched for a refusal


def is_refusal(text: str) -> bool:
    """Whether an answer declines the request (a phrase of REFUSAL_PATTERNS in its opening)."""
    opening = (text or "").replace("\u2019", "'").replace("\u2018", "'").strip()[:REFUSAL_WINDOW]
    return bool(_REFUSAL.search(opening))


def normalize_whitespace(text: str) -> str:
    return " ".join((text or "").split())


def refusal_to_compliance(rewrite: str, rejected: str) -> bool:
    """The rejected answer refused and the rewrite does not (compliance -> refusal is not it)."""
    return is_refusal(rejected) and not is_refusal(rewrite)


def length_ratio(rewrite_tokens: int, rejected_tokens: int) -> float:
    """How many times longer the longer of the two is (1.0: equal)."""
    short, long = sorted((max(rewrite_tokens, 1), max(rejected_tokens, 1)))
    return long / short


def cheap_reason(rewrite: str, rejected: str, tokenize: Tokenize,
                 settings: QualityFilterConfig, truncated: bool = False) -> str | None:
    """The first model-free reason to drop the pair, or None if it passes them all.
    `truncated`: the rewriter stopped at its token limit (finish reason "length")."""
    if not normalize_whitespace(rewrite):
        return "empty"
    if truncated and settings.drop_truncated:
        return "truncated"
    if normalize_whitespace(rewrite) == normalize_whitespace(rejected):
        return "identical"
    if settings.drop_refusal_to_compliance and refusal_to_compliance(rewrite, rejected):
        return "refusal_to_compliance"
    chosen_ids, rejected_ids = list(tokenize(rewrite)), list(tokenize(rejected))
    if min(len(chosen_ids), len(rejected_ids)) < settings.min_tokens:
        return "too_short"
    if len(chosen_ids) > settings.max_tokens:
        return "too_long"
    if length_ratio(len(chosen_ids), len(rejected_ids)) > settings.max_length_ratio:
        return "length_ratio"
    cut = settings.truncate_tokens
    if chosen_ids[:cut] == rejected_ids[:cut]:
        return "identical_after_truncation"
    return None


def judge_margins(judge, personas: Sequence[str | None], contexts: Sequence[Sequence],
                  rewrites: Sequence[str], rejected: Sequence[str]) -> list[float]:
    """P(rewrite better) - 0.5 under the judge (actors/judge.py), averaged over both orders
    so neither position is favoured."""
    if not rewrites:
        return []
    verdicts = judge.compare_batch(list(personas), list(contexts), list(rewrites), list(rejected))
    return [v.prob_a - 0.5 for v in verdicts]


def below_margin(margin: float, settings: QualityFilterConfig) -> bool:
    """The judge did not prefer the rewrite by at least `settings.margin`."""
    return margin < settings.margin
