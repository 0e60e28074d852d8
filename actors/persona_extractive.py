"""The `extractive` persona backend: a deterministic summary of one user's history.

No model: counts and patterns over the user's own turns, so it runs at WildChat scale and
its output can be checked. It reports what the paper's personas carry (Jin et al. 2025,
sec. 3: interests, format and tone preferences, recurring tasks), as short structured
lines:

    Languages: English (4), Chinese (1)
    Recurring tasks: coding (3), writing (2)
    Topics: python, pandas, essay, marketing
    Style: short requests (about 14 words)
    Stated preferences: prefers shorter answers; asks for Python

"Stated preferences" come only from the user's own feedback turns (follow-ups labelled
reattempt_feedback, correction or complaint), the strongest signal a log holds.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

# Recurring task kinds, by words a request uses (English and a few frequent WildChat
# languages). A request may count for several kinds.
TASK_PATTERNS = {
    "coding": r"\b(code|python|javascript|java|c\+\+|sql|function|bug|error|script|api|html|css|react)\b|```",
    "writing": r"\b(write|essay|story|poem|article|letter|email|blog|rewrite|paraphrase)\b|写|напиши",
    "translation": r"\b(translate|translation)\b|翻译|перевед",
    "math": r"\b(solve|calculate|equation|integral|probability|math)\b|计算|реши",
    "summarizing": r"\b(summari[sz]e|summary|tl;?dr)\b|总结",
    "brainstorming": r"\b(ideas?|suggest|brainstorm|names? for)\b",
    "explaining": r"^\s*(what|why|how|explain|describe)\b|什么|为什么|как|почему|что такое",
    "role-play": r"\b(role ?play|pretend|act as|you are now)\b",
}
# Preferences a feedback turn states, as (pattern, canonical phrase).
PREFERENCE_PATTERNS = [
    (r"\b(shorter|more concise|too long|less words|briefly|brief)\b|简短|短一点|короче", "prefers shorter answers"),
    (r"\b(longer|more detail|more detailed|at least \d+|expand|elaborate|too short)\b|详细|подробнее", "wants longer, more detailed answers"),
    (r"\b(bullet|list|table|step by step|numbered)\b|列表|表格", "likes structured answers (lists, tables, steps)"),
    (r"\b(formal|professional|academic)\b", "wants a formal tone"),
    (r"\b(casual|simple words|simpler|easy to understand|like i'?m five)\b", "wants simple, casual wording"),
    (r"\b(example|examples)\b|例子|пример", "asks for examples"),
    (r"\b(python 3|python)\b", "asks for Python"),
    (r"\b(javascript|typescript)\b", "asks for JavaScript/TypeScript"),
    (r"\bin (english|chinese|russian|spanish|french|german|japanese|korean|portuguese|arabic)\b",
     "wants answers in {0}"),
    (r"\b(wrong|incorrect|not what i asked|doesn'?t work|not working|mistake)\b|不对|错了|неправильно",
     "points out errors; values correctness"),
]
STOPWORDS = frozenset("""a about above after again all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself just me more
most my no nor not now of off on once only or other our out over own same she should so some such
than that the their them then there these they this those through to too under until up very was
we were what when where which while who whom why will with would you your yours please write give
make tell use using need want like help know get one two new also could would should thanks thank
hi hello ok okay yes sure let can't don't i'm it's""".split())
_WORD = re.compile(r"[a-zA-Z][a-zA-Z+#\-]{2,}")
_TASKS = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in TASK_PATTERNS.items()}
_PREFERENCES = [(re.compile(p, re.IGNORECASE), phrase) for p, phrase in PREFERENCE_PATTERNS]


def _ranked(counter: Counter, limit: int) -> str:
    return ", ".join(f"{key} ({n})" for key, n in counter.most_common(limit))


def stated_preferences(feedback: Sequence[str]) -> list[str]:
    """Canonical preferences stated in a user's feedback turns, most frequent first."""
    found: Counter = Counter()
    for message in feedback:
        for pattern, phrase in _PREFERENCES:
            match = pattern.search(message)
            if match:
                found[phrase.format(*(g.capitalize() for g in match.groups() if g))] += 1
    return [phrase for phrase, _ in found.most_common()]


def extractive_persona(history: Sequence[dict[str, Any]], max_chars: int = 600) -> str:
    """The persona of one user from earlier conversations (most recent first).

    Each history item has `turns` ([{role, content}]), `language`, and `feedback` (the
    user's feedback follow-ups in that conversation). Returns "" for an empty history.
    """
    if not history:
        return ""
    languages: Counter = Counter(item.get("language") or "unknown" for item in history)
    tasks: Counter = Counter()
    words: Counter = Counter()
    request_lengths = []
    feedback: list[str] = []
    for item in history:
        requests = [t["content"] for t in item["turns"] if t["role"] == "user"]
        feedback.extend(item.get("feedback") or [])
        for request in requests:
            request_lengths.append(len(request.split()))
            words.update(w.lower() for w in _WORD.findall(request) if w.lower() not in STOPWORDS)
        first = requests[0] if requests else ""
        tasks.update(name for name, pattern in _TASKS.items() if pattern.search(first))
    lines = [f"Languages: {_ranked(languages, 3)}"]
    if tasks:
        lines.append(f"Recurring tasks: {_ranked(tasks, 4)}")
    topics = [w for w, n in words.most_common(8) if n >= 1][:6]
    if topics:
        lines.append(f"Topics: {', '.join(topics)}")
    mean = sum(request_lengths) / max(len(request_lengths), 1)
    style = "short requests" if mean < 25 else "detailed requests" if mean > 80 else "medium-length requests"
    lines.append(f"Style: {style} (about {round(mean)} words), {len(history)} earlier conversations")
    preferences = stated_preferences(feedback)
    if preferences:
        lines.append(f"Stated preferences: {'; '.join(preferences[:5])}")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 1].rsplit("\n", 1)[0]
