"""A fast matcher for families of cue phrases, used by the `rules` follow-up backend.

Python's `re` tries every branch of an alternation at every position: too slow for hundreds
of cue phrases at 10,000 messages a second. `Cues` buckets the phrases by their first
letters and searches only the buckets keyed by a word of the message.
"""
from __future__ import annotations

import re
from collections import defaultdict

WORD_START = re.compile(r"\b\w{1,3}")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
REGEX_TOKEN = re.compile(r"\\.|\[(?:\\.|[^\]])*\]|[()|]|[^\\\[()|]+")
# bytes.translate table: ASCII word characters kept, everything else a space.
ASCII_WORDS = bytes(c if chr(c).isalnum() or c == 95 else 32 for c in range(128)) + bytes(
    range(128, 256))


def _top_level(alternation: str) -> list[str]:
    """Split a regex alternation at its top-level `|`."""
    parts, depth = [""], 0
    for tok in REGEX_TOKEN.findall(alternation):
        depth += (tok == "(") - (tok == ")")
        if tok == "|" and depth == 0:
            parts.append("")
        else:
            parts[-1] += tok
    return parts


def _expand(phrase: str) -> list[str]:
    """Spell out a leading group, "(?:a|b)c" -> ["ac", "bc"], so that each phrase has a key."""
    if not phrase.startswith("(?:"):
        return [phrase]
    depth = 0
    for end in REGEX_TOKEN.finditer(phrase):
        depth += (end.group() == "(") - (end.group() == ")")
        if depth == 0:
            break
    inner, rest = phrase[3:end.start()], phrase[end.end():]
    options = [""] if rest[:1] == "?" else []
    return [p for o in _top_level(inner) + options for p in _expand(o + rest[len(options):])]


def _keyed(phrase: str) -> tuple[str | None, str]:
    """Split a phrase into the (up to 3) letters every match starts with, and the rest."""
    m = re.match(r"([^\W\d_]+)([?*{]?)", phrase)
    key = (m.group(1)[:-1] if m.group(2) else m.group(1))[:3] if m else ""
    if not key:
        return None, phrase
    if len(key) < 3 and re.match(r"[^\s'-]", phrase[len(key):]):
        # A message word "okay" is looked up as "oka": "ok(?:ay)?" would never be found.
        raise ValueError(f"cue {phrase!r}: spell out words shorter than 3 letters")
    return key, phrase[len(key):]


def cue_keys(text: str) -> frozenset[str]:
    """What `Cues.search` looks up: the first (up to) 3 letters of each word."""
    if text.isascii():
        return frozenset([w[:3] for w in text.encode().translate(ASCII_WORDS).decode().split()])
    return frozenset(WORD_START.findall(text))


class Cues:
    """A family of cue phrases (a regex alternation), matched as whole words, fast.

    Python's `re` tries every branch of an alternation at every position: too slow for hundreds
    of cues at 10,000 messages a second. So phrases are bucketed by their first letters; only
    buckets keyed by a word of the message are searched, each with its key as a literal prefix
    (which `re` scans for quickly). CJK cues are searched only in text with CJK characters.
    """

    def __init__(self, words: str, cjk: str = ""):
        buckets: dict[str | None, list[str]] = defaultdict(list)
        for phrase in (p for top in _top_level(words) for p in _expand(top)):
            key, rest = _keyed(phrase)
            buckets[key].append(rest)
        always = buckets.pop(None, None)
        self.always = re.compile(rf"(?<!\w)(?:{'|'.join(always)})(?!\w)") if always else None
        self.buckets = {k: re.compile(rf"{k}(?:{'|'.join(v)})(?!\w)") for k, v in buckets.items()}
        self.letters = frozenset(self.buckets)
        self.cjk = re.compile(cjk) if cjk else None

    def search(self, text: str, keys: frozenset[str]) -> bool:
        """Whether any cue occurs in `text`, whose `cue_keys` are `keys`."""
        if self.always and self.always.search(text):
            return True
        for k in self.letters & keys:
            for m in self.buckets[k].finditer(text):
                i = m.start()
                if i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"):
                    return True
        return bool(self.cjk and CJK.search(text) and self.cjk.search(text))
