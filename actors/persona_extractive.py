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

Topics are the user's most frequent request words, never a name: a word the user only ever
wrote Capitalised ('Martha', 'Paris') is left out, and so are addresses, links and handles.

"Stated preferences" come only from the user's own feedback turns (follow-ups labelled
reattempt_feedback, correction or complaint), the strongest signal a log holds, so they come
first (a persona cut to its budget loses its last lines). Each is one value of a dimension
(length, format, tone, examples, how an answer ends, code language, answer language), read
by the structure of the message (`actors.preference_reader`: negation, "too X",
comparatives, who wanted what, counts) and resolved per user (`stated_preferences`).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Sequence

from actors.preference_reader import read_preferences

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
# The persona line of each preference value a feedback turn can state: the five answer
# properties `actors.preference_reader` reads, the code language, the answer language.
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
}
CODE_CUES = {"python": re.compile(r"\b(?:in |use |with )python\b|\bpython ?3\b", re.IGNORECASE),
             "javascript": re.compile(r"\b(?:in |use |with )(?:javascript|typescript|js|ts)\b", re.IGNORECASE)}
# Asking for the answer in a language, in English or in that language's own words ("en
# français", "на русском", "用中文"): the language's English name.
LANGUAGE_CUES = {
    "English": r"\bin english\b|\ben anglais\b|\ben ingl[eé]s\b|на английском|\bauf englisch\b|\bem ingl[eê]s\b|用英文|英文回答",
    "Chinese": r"\bin chinese\b|\ben chinois\b|\ben chino\b|на китайском|\bauf chinesisch\b|用中文|中文回答",
    "Russian": r"\bin russian\b|\ben russe\b|\ben ruso\b|на русском|по-русски|\bauf russisch\b",
    "Spanish": r"\bin spanish\b|\ben espagnol\b|\ben espa[nñ]ol\b|на испанском|\bauf spanisch\b|\bem espanhol\b",
    "French": r"\bin french\b|\ben fran[cç]ais\b|\ben franc[eé]s\b|на французском|\bauf französisch\b|\bem franc[eê]s\b",
    "German": r"\bin german\b|\ben allemand\b|\ben alem[aá]n\b|на немецком|\bauf deutsch\b|\bem alem[aã]o\b",
    "Japanese": r"\bin japanese\b|\ben japonais\b|\ben japon[eé]s\b|на японском|用日文|用日语|日本語で",
    "Korean": r"\bin korean\b|\ben coréen\b|\ben coreano\b|на корейском|한국어로",
    "Portuguese": r"\bin portuguese\b|\ben portugais\b|\ben portugu[eé]s\b|на португальском|\bem portugu[eê]s\b",
    "Arabic": r"\bin arabic\b|\ben arabe\b|\ben [aá]rabe\b|на арабском|بالعربية|باللغة العربية",
}
LANGUAGE_CUE = re.compile("|".join(f"(?P<{name}>{cue})" for name, cue in LANGUAGE_CUES.items()), re.IGNORECASE)
STOPWORDS = frozenset("""a about above after again all also am an and any are as at be because been
before being below between both but by can could did do does doing down during each few for from
further had has have having he her here hers him his how i if in into is it its itself just me more
most my no nor not now of off on once only or other our out over own same she should so some such
than that the their them then there these they this those through to too under until up very was
we were what when where which while who whom why will with would you your yours please write give
make tell use using need want like help know get one two new also could would should thanks thank
hi hello ok okay yes sure let can't don't i'm it's""".split())
_WORD = re.compile(r"[a-zA-Z][a-zA-Z+#\-]{2,}")
# Text whose words are addresses, not topics: e-mails (from the token's start, so a long
# token is scanned once), links, @handles, redaction placeholders (ours and WildChat's own).
_ADDRESS = re.compile(r"(?<!\S)[^\s@]+@\S+|\b(?:https?://|www\.)\S+|(?<!\w)@\w+|<(?:REDACTED|PRESIDIO_ANONYMIZED)_\w+>")
_TASKS = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in TASK_PATTERNS.items()}


def _ranked(counter: Counter, limit: int) -> str:
    return ", ".join(f"{key} ({n})" for key, n in counter.most_common(limit))


def message_preferences(message: str, answer: str | None = None) -> list[tuple[str, str]]:
    """(dimension, value) for every answer-style preference one feedback message states, in
    text order, read by structure (`actors.preference_reader`): length short/medium/long,
    format structured/prose, register formal/casual, examples yes/no, ending
    question/statement; plus a code language it asks for. Nothing for a message that states
    nothing. `answer`, the answer the message reacts to, reads a bare word count against it."""
    found = read_preferences(message, answer)
    found += [("code", language) for language, cue in CODE_CUES.items() if cue.search(message)]
    return found


def stated_languages(message: str) -> list[str]:
    """Answer languages one feedback message asks for ("in French"), capitalised."""
    return [match.lastgroup for match in LANGUAGE_CUE.finditer(message)]


def stated_preferences(feedback: Sequence[str]) -> list[str]:
    """Canonical preferences stated in a user's feedback turns (oldest first): one value per
    dimension, the one named most often (the latest on a tie), most-named dimensions first."""
    votes: dict[str, Counter] = {}
    latest: dict[tuple[str, str], int] = {}
    for i, message in enumerate(feedback):
        for dim, value in message_preferences(message):
            votes.setdefault(dim, Counter())[value] += 1
            latest[dim, value] = i
        for name in stated_languages(message):
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
    common: set[str] = set()  # words the user wrote at least once other than Capitalised
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
            found = _WORD.findall(_ADDRESS.sub(" ", request))
            words.update(w.lower() for w in found if w.lower() not in STOPWORDS)
            common.update(w.lower() for w in found if not w.istitle())
        first = requests[0] if requests else ""
        tasks.update(name for name, pattern in _TASKS.items() if pattern.search(first))
    preferences = stated_preferences(feedback)
    lines = [f"Stated preferences: {'; '.join(preferences[:6])}"] if preferences else []
    lines.append(f"Languages: {_ranked(languages, 3)}")
    if tasks:
        lines.append(f"Recurring tasks: {_ranked(tasks, 4)}")
    # A word the user only ever wrote Capitalised is taken for a name (a person, a place, a
    # firm: 'John', 'Smith') and never becomes a topic; 'Python' counts once written 'python'.
    topics = [w for w, _ in words.most_common() if w in common][:6]
    if topics:
        lines.append(f"Topics: {', '.join(topics)}")
    mean = sum(request_lengths) / max(len(request_lengths), 1)
    style = "short requests" if mean < 25 else "detailed requests" if mean > 80 else "medium-length requests"
    lines.append(f"Style: {style} (about {round(mean)} words), {len(history)} earlier conversations")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[: max_chars - 1].rsplit("\n", 1)[0]
