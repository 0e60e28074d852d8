"""Reasoning benchmarks of the evaluate stage: GSM8K and MATH-500, read and scored.

Does persona-DPO on chat logs cost reasoning? (Jin et al. 2025 report GSM8K and MATH-500
alongside the user-facing win rates.) Both arms answer each problem without a persona; the
final answer is compared to the gold one with `math-verify` (symbolic equivalence, so
`\\boxed{\\frac{1}{2}}` matches `0.5` and `\\left(1, 2\\right]` matches `(1,2]`).

File formats (JSON lines; point `evaluate.gsm8k.path` / `evaluate.math500.path` at full sets):
- GSM8K (openai/gsm8k, test split): `question`, `answer` = worked solution ending in
  `#### <number>`.
- MATH-500 (HuggingFaceH4/MATH-500): `problem`, `solution`, `answer` (LaTeX, no `$`).
"""
from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from pipelines.contract import json_object_lines

GSM8K_INSTRUCTION = ("Solve the problem step by step. End with a line 'The answer is N.' where N "
                     "is the final number.")
MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."
_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


@dataclass(frozen=True)
class Problem:
    """One benchmark item: the prompt shown, and the gold final answer as text."""

    item_id: str
    prompt: str
    gold: str


def read_jsonl(path: Path | str, required: Sequence[str]) -> list[dict]:
    """Rows of a JSON-lines file; an error naming the file and line if a field is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} does not exist: set its `path` in the "
                                "evaluate section")
    rows = []
    for where, row in json_object_lines(path):
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; expected {list(required)}")
        rows.append(row)
    return rows


def select(rows: list, n: int, how: Literal["first", "sample"], seed: int) -> list[tuple[int, object]]:
    """(index, row) of `n` rows: the first n, or a seeded sample kept in file order."""
    indexed = list(enumerate(rows))
    if how == "first" or n >= len(rows):
        return indexed[:n]
    return sorted(random.Random(seed).sample(indexed, n), key=lambda pair: pair[0])


def gsm8k_gold(answer: str) -> str:
    """The final number after `#### ` in a GSM8K solution."""
    number = _clean_number(answer.rsplit("####", 1)[1]) if "####" in answer else ""
    if not number:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return number


def load_gsm8k(path: Path | str, n: int, how: Literal["first", "sample"], seed: int) -> list[Problem]:
    rows = read_jsonl(path, ("question", "answer"))
    problems = []
    for i, row in select(rows, n, how, seed):
        try:
            problems.append(Problem(f"gsm8k-{i}", f"{row['question']}\n\n{GSM8K_INSTRUCTION}", gsm8k_gold(row["answer"])))
        except ValueError as exc:
            raise ValueError(f"{path}, row {i + 1} (question {row['question'][:60]!r}): {exc}") from None
    return problems


def load_math500(path: Path | str, n: int, how: Literal["first", "sample"], seed: int) -> list[Problem]:
    rows = read_jsonl(path, ("problem", "answer"))
    return [Problem(row.get("unique_id") or f"math500-{i}", f"{row['problem']}\n\n{MATH_INSTRUCTION}",
                    row["answer"]) for i, row in select(rows, n, how, seed)]


def _clean_number(text: str) -> str:
    return text.strip().replace(",", "").replace("$", "").strip().rstrip(".").strip()


def extract_gsm8k(text: str) -> str | None:
    """The final number of a GSM8K-style answer: after `####`, else after 'answer is', else
    the last number in the text. Thousands separators and dollar signs are dropped."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer is[:\s]*(" + _NUMBER + ")"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _clean_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _clean_number(numbers[-1]) if numbers else None


def _timeout() -> int | None:
    # math-verify times out with SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def matches(gold: str, prediction: str | None, *, latex: bool) -> bool:
    """Whether `prediction` equals `gold` by math-verify. `latex`: gold is a LaTeX
    expression (MATH-500) and the prediction is the model's full answer (its `\\boxed{}` or
    last expression is extracted); else both are plain numbers."""
    from math_verify import parse, verify

    if prediction is None:
        return False
    timeout = _timeout()
    gold_parsed = parse(f"${gold}$" if latex else gold, parsing_timeout=timeout)
    predicted = parse(prediction, parsing_timeout=timeout)
    return bool(gold_parsed and predicted and verify(gold_parsed, predicted, timeout_seconds=timeout))


def score(problem: Problem, answer: str, benchmark: Literal["gsm8k", "math500"]) -> tuple[str | None, bool]:
    """(the extracted final answer, correct?) of one model answer."""
    if benchmark == "gsm8k":
        extracted = extract_gsm8k(answer)
        return extracted, matches(problem.gold, extracted, latex=False)
    return answer[-200:], matches(problem.gold, answer, latex=True)
