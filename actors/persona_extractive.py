"""The `extractive` persona backend: a deterministic summary of one user's history.

No model: counts and patterns over the user's own turns, so it runs at WildChat scale and
its output can be checked. It reports what the paper's personas carry (Jin et al. 2025,
sec. 3: interests, format and tone preferences, recurring tasks), as short structured
lines:

    Stated preferences: prefers shorter answers; asks for Python
    Languages: English (4), Chinese (1)
    Recurring tasks: coding (3), writing (2)
    Topics: python, pandas, essay, marketing
    Style: short requests (about 14 words)

"Stated preferences" come only from the user's own feedback turns (follow-ups labelled
reattempt_feedback, correction or complaint), the strongest signal a log holds, so they come
first (a persona cut to its budget loses its last lines). Each is one value of a dimension
(length, format, tone, examples, how an answer ends, code language, answer language), read
with its negation ("no examples") and resolved per user (`stated_preferences`).
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
# Preferences a feedback turn states. Each cue names one value of a dimension, and a user
# holds one value per dimension: the value named most often, the latest on a tie (a user who
# asked for bullets once and for "no lists" twice wants prose).
DIMENSIONS: dict[str, dict[str, str]] = {
    "length": {"short": "prefers shorter answers", "medium": "prefers medium-length answers",
               "long": "wants longer, more detailed answers"},
    "format": {"structured": "likes structured answers (lists, tables, steps)",
               "prose": "prefers plain paragraphs over lists"},
    "register": {"formal": "wants a formal tone", "casual": "wants simple, casual wording"},
    "examples": {"yes": "asks for examples", "no": "does not want examples"},
    "ending": {"question": "likes answers that end with a question",
               "statement": "does not want answers to end with a question"},
    "code": {"python": "asks for Python", "javascript": "asks for JavaScript/TypeScript"},
    "correctness": {"yes": "points out errors; values correctness"},
}
# (pattern, dimension, value, fixed), tried in this order; text a cue matched is not matched
# again. A fixed cue ("too long") says what the user wants whatever surrounds it; any other
# cue is read with its polarity (`_negated`): negated, it counts for the dimension's other
# value where there is exactly one, and for nothing where there are several.
PREFERENCE_CUES = [
    (r"\bnot too (long|short)\b", "length", "medium", True),
    (r"\btoo (long|wordy|verbose)\b|слишком длинно", "length", "short", True),
    (r"\btoo (short|brief)\b", "length", "long", True),
    (r"\btoo (formal|stiff)\b", "register", "casual", True),
    (r"\btoo (casual|informal|chatty)\b", "register", "formal", True),
    (r"\b(python 3|python)\b", "code", "python", True),
    (r"\b(javascript|typescript)\b", "code", "javascript", True),
    (r"\b(wrong|incorrect|not what i asked|doesn'?t work|not working|mistake)\b|不对|错了|неправильно",
     "correctness", "yes", True),
    (r"\b(medium|moderate|a paragraph or two)\b", "length", "medium", False),
    ((r"\b(shorter|more concise|concise|less words|fewer words|briefly|brief|short|few lines|gist|"
      r"under \w+ words)\b|简短|短一点|короче"), "length", "short", False),
    ((r"\b(longer|long|more detail|more detailed|in depth|depth|thorough|at least \w+ words|expand|"
      r"elaborate|lots of detail|detailed|well over)\b|详细|подробнее"), "length", "long", False),
    (r"\b(bullets?|bullet points?|lists?|tables?|step by step|numbered|points with dashes)\b|列表|表格",
     "format", "structured", False),
    (r"\b(paragraphs?|prose|flowing text|plain text)\b", "format", "prose", False),
    (r"\b(formal|professional|academic|like a report)\b", "register", "formal", False),
    ((r"\b(casual|informal|chatty|relaxed|slang|like a friend|simple words|simpler|easy to understand|"
      r"like i'?m five)\b"), "register", "casual", False),
    ((r"\b(end|ends|ending|finish|finishes|close|closes)\b[^.;:!?]*?\b(question|asking)|"
      r"\bquestions? (at|in) the end\b|\bask(ing)? me\b"), "ending", "question", False),
    (r"\b(plain statement|with a statement)\b", "ending", "statement", False),
    (r"\bexamples?\b|例子|пример", "examples", "yes", False),
]
LANGUAGE_CUE = re.compile(r"\bin (english|chinese|russian|spanish|french|german|japanese|korean|"
                          r"portuguese|arabic)\b", re.IGNORECASE)
# Words that turn the cue right after them around ("no examples", "without bullets") ...
NEGATORS = r"no|not|without|don'?t|do not|doesn'?t|skip|avoid|stop|never|less|fewer|instead of|rather than"
NEGATOR_REACH_WORDS = 3
# ... phrases that say what the answer was, so what follows is what the user did not want ...
DESCRIBERS = r"this is|this has|it is|it has|you went with|you used|you gave|you wrote|came out as"
# ... and phrases that say what the user wants, which end a describer's reach.
WANTERS = r"need|needs|want|wanted|asked for|ask for|was after|please|prefer|would like|i'?d like"
_TRIGGER = re.compile(rf"\b(?:(?P<neg>{NEGATORS})|(?P<desc>{DESCRIBERS})|(?P<want>{WANTERS}))\b",
                      re.IGNORECASE)
_SENTENCE = re.compile(r"[^.;:!?\n]+")  # a sentence, or a clause ended by ":" or ";"
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
_CUES = [(re.compile(p, re.IGNORECASE), dim, value, fixed) for p, dim, value, fixed in PREFERENCE_CUES]


def _ranked(counter: Counter, limit: int) -> str:
    return ", ".join(f"{key} ({n})" for key, n in counter.most_common(limit))


def _negated(before: str) -> bool:
    """Whether a cue preceded by `before` (its sentence so far) counts against its value: the
    negators within reach, and whether the nearest describer or wanter is a describer, each
    turn it around once ("this has no examples" wants examples)."""
    triggers = list(_TRIGGER.finditer(before))
    flips = sum(1 for t in triggers
                if t.group("neg") and len(before[t.end():].split()) <= NEGATOR_REACH_WORDS)
    nearest = next((t for t in reversed(triggers) if not t.group("neg")), None)
    flips += bool(nearest and nearest.group("desc"))
    return flips % 2 == 1


def message_preferences(message: str) -> list[tuple[str, str]]:
    """(dimension, value) for every preference cue in one feedback message, in text order."""
    found: list[tuple[int, str, str]] = []
    for part in _SENTENCE.finditer(message):
        sentence, offset = part.group(), part.start()
        taken = [False] * len(sentence)
        for pattern, dim, value, fixed in _CUES:
            for match in pattern.finditer(sentence):
                if any(taken[match.start():match.end()]):
                    continue
                taken[match.start():match.end()] = [True] * (match.end() - match.start())
                wanted = value
                if not fixed and _negated(sentence[:match.start()]):
                    others = [v for v in DIMENSIONS[dim] if v != value]
                    if len(others) != 1:
                        continue
                    wanted = others[0]
                found.append((offset + match.start(), dim, wanted))
    ordered = [(dim, value) for _, dim, value in sorted(found)]
    return list(dict.fromkeys(ordered))  # a message votes once for each value it names


def stated_preferences(feedback: Sequence[str]) -> list[str]:
    """Canonical preferences stated in a user's feedback turns (oldest first): one value per
    dimension, the one named most often (the latest on a tie), most-named dimensions first."""
    votes: dict[str, Counter] = {}
    latest: dict[tuple[str, str], int] = {}
    for i, message in enumerate(feedback):
        for dim, value in message_preferences(message):
            votes.setdefault(dim, Counter())[value] += 1
            latest[dim, value] = i
        for match in LANGUAGE_CUE.finditer(message):
            name = match.group(1).capitalize()
            votes.setdefault("language", Counter())[name] += 1
            latest["language", name] = i
    chosen = []
    for dim, counter in votes.items():
        value = max(counter, key=lambda v: (counter[v], latest[dim, v]))
        phrase = f"wants answers in {value}" if dim == "language" else DIMENSIONS[dim][value]
        chosen.append((-counter[value], -latest[dim, value], phrase))
    return [phrase for *_, phrase in sorted(chosen)]


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
    for item in reversed(history):  # oldest first, so the latest statement wins a tie
        feedback.extend(item.get("feedback") or [])
    said = set(feedback)
    for item in history:
        # Topics and request style come from requests; feedback turns only state preferences.
        requests = [t["content"] for t in item["turns"] if t["role"] == "user" and t["content"] not in said]
        for request in requests:
            request_lengths.append(len(request.split()))
            words.update(w.lower() for w in _WORD.findall(request) if w.lower() not in STOPWORDS)
        first = requests[0] if requests else ""
        tasks.update(name for name, pattern in _TASKS.items() if pattern.search(first))
    preferences = stated_preferences(feedback)
    lines = [f"Stated preferences: {'; '.join(preferences[:6])}"] if preferences else []
    lines.append(f"Languages: {_ranked(languages, 3)}")
    if tasks:
        lines.append(f"Recurring tasks: {_ranked(tasks, 4)}")
    topics = [w for w, n in words.most_common(8) if n >= 1][:6]
    if topics:
        lines.append(f"Topics: {', '.join(topics)}")
    mean = sum(request_lengths) / max(len(request_lengths), 1)
    style = "short requests" if mean < 25 else "detailed requests" if mean > 80 else "medium-length requests"
    lines.append(f"Style: {style} (about {round(mean)} words), {len(history)} earlier conversations")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 1].rsplit("\n", 1)[0]
