"""The words of stated preferences: the vocabulary, text normalisation, the concepts that
name each value (in English and the most frequent other WildChat languages) and counts of
words, sentences, lines, paragraphs or pages read against the length bands.

`actors/preference_reader.py` reads them with the structure around them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

VALUES = {"length": ("short", "medium", "long"), "format": ("structured", "prose"),
          "register": ("formal", "casual"), "examples": ("yes", "no"), "ending": ("question", "statement")}
SHORT_MAX_WORDS, MEDIUM_MAX_WORDS = 40, 100  # the length bands a count is read against
WORDS_PER = {"word": 1, "sentence": 14, "line": 12, "paragraph": 70, "page": 400, "character": 1 / 6}
# The other value of a dimension; for length, the far one ("not short" reads as long).
OPPOSITE = {("length", "short"): "long", ("length", "long"): "short", ("format", "structured"): "prose",
            ("format", "prose"): "structured", ("register", "formal"): "casual",
            ("register", "casual"): "formal", ("examples", "yes"): "no", ("examples", "no"): "yes",
            ("ending", "question"): "statement", ("ending", "statement"): "question"}

# ---------------------------------------------------------------- normalising the text

_CONTRACTIONS = [(r"\bcan'?t\b", "can not"), (r"\bwon'?t\b", "will not"), (r"\b(\w+)n't\b", r"\1 not"),
                 (r"\b(do|does|did|is|was|are|were|should|would|could|have|has)nt\b", r"\1 not"),
                 (r"\bi'?m\b", "i am"), (r"\b(you|we|they)'re\b", r"\1 are"), (r"\b(it|that|this|what)'s\b", r"\1 is"),
                 (r"\b(it|that)s\b", r"\1 is"), (r"\bi'd\b", "i would"), (r"\b(i|you|we)'ll\b", r"\1 will"),
                 (r"\b(i|you|we)'ve\b", r"\1 have"), (r"\btl;? ?dr\b", "tldr")]
_SPELLING = {"pls": "please", "plz": "please", "pleese": "please", "u": "you", "ur": "your",
             "exemple": "example", "exemples": "examples", "exmaple": "example", "examle": "example",
             "bulet": "bullet", "bulets": "bullets", "bulletpoints": "bullet points", "shorte": "shorter",
             "shoter": "shorter", "lenght": "length", "detials": "details", "detial": "detail",
             "formel": "formal", "casul": "casual", "informel": "informal", "questoin": "question",
             "quesiton": "question", "paragraf": "paragraph", "paragraphe": "paragraph", "alot": "a lot",
             "abit": "a bit", "wrods": "words", "wirte": "write", "langauge": "language"}


def normalize(text: str) -> str:
    """Lower case, straight quotes, contractions spelled out, common misspellings fixed."""
    text = text.lower()
    for curly, straight in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2014", " - ")):
        text = text.replace(curly, straight)
    for pattern, replacement in _CONTRACTIONS:
        text = re.sub(pattern, replacement, text)
    text = re.sub(r"[\"'][^\"'\n]{1,80}\?[\"']", " a question ", text)  # "the 'want more?' at the end"
    text = re.sub(r"[\"\u00ab][^\"\u00bb]{40,}[\"\u00bb]|(?<!\w)'[^'\n]{40,}'", " ", text)  # quoted material
    text = re.sub(r"[()\[\]:*]|\s-+\s|\.\.\.", ", ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)|\"", " ", text)  # quote marks (apostrophes are spelled out above)
    text = re.sub(r"[a-z]+", lambda m: _SPELLING.get(m.group(), m.group()), text)
    return re.sub(r"[ \t]+", " ", text)


# ---------------------------------------------------------------- concepts

@dataclass(frozen=True)
class Concept:
    """Words naming one value of a dimension. `complaint`: the words themselves say what was
    wrong with the answer (wordy, stiff, too abstract), so their value holds in any frame."""

    pattern: str
    dimension: str
    value: str
    complaint: bool = False
    context: bool = False
    """What the answer is for ("it is for my professor"): a wish however it is framed."""


_END = r"(?:end|ends|ending|finish|finishes|finishing|close|closes|closing|wrap|wraps|wrapping|conclude|last line|" \
       r"last sentence|last bit|final line|final sentence|sign off)"
_QUESTION = r"(?:questions?|asking|asks|ask|checks? in|check in|quiz)"
_STATEMENT = r"(?:statements?|plain sentence|full stop|period|conclusion|plain ending|flat ending)"
CONCEPTS = [
    # length
    Concept(r"short|shorter|shortest|brief|briefer|briefly|concise|concisely|succinct|terse|compact|to the point|"
            r"tldr|gist|summar(?:ise|ize|ised|ized)|sum it up|read in (?:a few|five|ten|\d+) seconds|quick read|at a glance|in a nutshell|bare minimum|one[- ]liners?|fewer words|"
            r"less text|less words|condensed?|shorten(?:ed)?|trim(?:med)?|cut (?:it|this|that) down|cut down|"
            r"boil(?:ed)? (?:it |this )?down|squeeze|tighten|tight|tiny|snappier|half as long|quick (?:answer|reply|"
            r"version|summary|one|take)|keep it quick|make it quick|little answer|small answer|short version",
            "length", "short"),
    Concept(r"wordy|verbose|rambl(?:e|es|ed|ing|y)|waffl(?:e|es|ed|ing)|padding|padded|bloated|long[- ]winded|"
            r"too much text|too much (?:for me )?to read|read all that|overlong", "length", "short", complaint=True),
    Concept(r"long|longer|lengthy|lengthier|detail|details|detailed|in[- ]depth|depth|deep|deeper|deeply|thorough|"
            r"thoroughly|comprehensive|elaborate|expand|expanded|extend|extended|flesh(?:ed)? (?:it |this )?out|"
            r"dig into|at length|in (?:\w+ )?detail|exhaustive|extensive|full explanation|full version|in full|more words|"
            r"more content|more information|twice as long|double the length|spell it out|fuller|essay|essays|"
            r"essay[- ]length|novel|walkthrough|full[- ]length", "length", "long"),
    # what the answer is for, not how long it is: states no length
    Concept(r"(?:going|goes|go) (?:in|into|to|for) (?:an? |my |the )?(?:essay|paper|report)|for (?:an? |my )?essay",
            "length", "", context=True),
    Concept(r"thin|skimpy|bare[- ]bones|superficial|shallow|too short|too brief", "length", "long", complaint=True),
    Concept(r"medium|medium[- ]length|medium[- ]sized|moderate|moderately(?: long| short| sized)?|middle ground|"
            r"middle[- ]of[- ]the[- ]road(?: length)?|in between|in-between|mid[- ]length|not too long|"
            r"not too short|neither (?:too )?\w+ nor (?:too )?\w+|somewhere in the middle|not long not short|"
            r"(?:normal|regular|average|reasonable|standard)[- ](?:length|sized?)|reasonabl[ey][- ]sized|"
            r"reasonable length|a (?:bit|little) longer|slightly longer|somewhat longer|a (?:bit|little) more(?= *(?:,|$))",
            "length", "medium"),
    # format
    Concept(r"bullets?|bulleted|bullet points?|bullet list|dot points?|lists?|listed|listicle|numbered|numbering|"
            r"number (?:them|the steps|it|each)|checklist|steps|step[- ]by[- ]step|(?:in|into|as) points|key points|dashes|"
            r"tables?|tabular|outline|headings?|headers|one per line|structured|structure (?:it|this)|more structure|"
            r"break (?:it|this) (?:up|down|into)|"
            r"split (?:it|this) into|itemi[sz]ed?|skimmable|point[- ]by[- ]point|one by one|"
            r"list of (?:points|steps|items|bullets|tips)|numbered steps|bullet[- ]point", "format", "structured"),
    Concept(r"listy|choppy|fragmented|fragments|broken up", "format", "prose", complaint=True),
    Concept(r"prose|paragraphs|paragraph form|paragraph[- ]style|(?:as|in|into) (?:a |one )?(?:single |proper |normal |real )?paragraph|"
            r"in sentences|full sentences|complete sentences|proper sentences|normal text|plain text|flowing|flow|"
            r"flows|narrative|continuous(?: text)?|(?:like|as) an essay|essay[- ]style|essay form|"
            r"written[- ]out|write it (?:out )?normally|normal writing|running text|block of text|regular prose",
            "format", "prose"),
    # register
    Concept(r"formal|formally|professional|professionally|business[- ]style|academic|"
            r"academically|serious|polished|official|business tone|business letter|businesslike|business[- ]like|respectful|courteous|proper language|dignified|diplomatic|"
            r"tone it down|(?:so|that|very) proper|proper formal|formal writing", "register", "formal"),
    Concept(r"(?:suitable |appropriate |fit )?for (?:a |an |my |the |our )?(?:client|boss|professor|teacher|manager|publication|thesis|board|hr|"
            r"cover letter|job application|interview|report|work|business|company|customer)s?|"
            r"going (?:in|into|to) (?:a |my |the )?(?:report|boss|client|thesis|paper)|(?:boss|client|professor|"
            r"manager) will read", "register", "formal", context=True),
    Concept(r"for (?:a |an |my |the )?(?:friend|friends|kid|kids|child|birthday card|group chat|slack message|"
            r"text message|instagram|tiktok)s?", "register", "casual", context=True),
    Concept(r"sloppy|unprofessional|slangy|childish|flippant", "register", "formal", complaint=True),
    Concept(r"casual|casually|informal|informally|chatty|conversational|relaxed|laid[- ]back|friendly|friendlier|"
            r"chill|chilled|loosen (?:it )?up|loose|slang|contractions|like a (?:friend|buddy|person|human|normal person|"
            r"real person)|like (?:you are|you were) (?:texting|talking|explaining it)|texting|more human|"
            r"sounds? (?:more )?human|simple words|simpler words|simple language|simpler language|simple terms|simpler terms|"
            r"simpler|simplicity|simple english|plain english|everyday (?:words|language|talk)|plain talk|"
            r"easy to understand|like i am (?:five|5)|eli5|fun|lighter|warmer|talk normally|normal person|"
            r"sounds? like a (?:real )?(?:person|human)|exclamation (?:marks?|points?)", "register", "casual"),
    Concept(r"stiff|stiffer|robotic|robot|stuffy|like a textbook|textbook[- ](?:like|style)|legal document|uptight|wooden|too proper|corporate|"
            r"pompous|bureaucratic", "register", "casual", complaint=True),
    # examples
    Concept(r"examples?|for[- ]instances?|e\.g\.|sample cases?|illustrat(?:e|ed|ion|ions)|demonstrat(?:e|ion)|"
            r"worked example|concrete|real numbers", "examples", "yes"),
    Concept(r"abstract|purely general|theoretical", "examples", "no"),
    # ending
    Concept(rf"{_END}\b(?:[^\w,]+\w+){{0,6}}?[^\w,]+(?:a |an |the |by |with |on |me )?{_QUESTION}|"
            rf"{_QUESTION}(?:[^\w,]+\w+){{0,4}}?[^\w,]+(?:at the end|to finish|to close|to end|to wrap up|in the end|"
            rf"at the bottom)|follow[- ]up questions?|closing questions?|ending questions?|final questions?|"
            rf"questions? (?:back )?to me|questions? back|ask(?:ing|s)? me (?:a |some |something|anything|"
            rf"questions?|what|if|whether|back)|quiz me|leaves? me with a question|a question to (?:close|end|finish)",
            "ending", "question"),
    Concept(rf"{_END}\b(?:[^\w,]+\w+){{0,5}}?[^\w,]+(?:a |an |the |with |on )?(?:plain |simple |clear |flat )?{_STATEMENT}|"
            rf"{_STATEMENT} at the end|end (?:it )?cleanly|(?:no|zero|without) (?:a )?(?:closing |final )?questions?|"
            rf"(?:just|simply) ends",
            "ending", "statement"),
]
def _alternatives(pattern: str) -> list[str]:
    """A pattern's top-level alternatives: each is compiled on its own, so that at any
    position every alternative's match is seen and the longest can be chosen."""
    parts, depth, current = [], 0, ""
    for token in re.findall(r"\\.|\[(?:\\.|[^\]])*\]|[()|]|[^\\\[()|]+", pattern):
        depth += (token == "(") - (token == ")")
        if token == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += token
    return parts + [current]


# The same concepts in the other languages WildChat users write most (Chinese, Russian,
# Spanish, Portuguese, French, Italian, German): the common words only, read without frames.
FOREIGN = [
    Concept(r"简短|简洁|精简|短一点|短一些|缩短|简单点|简要|概括|короче|кратко|короткий|коротк\w*|сократи\w*|"
            r"más corto|mas corto|resum\w+|breve|plus court|résum\w+|resumo|resuma|mais curto|più breve|riassum\w+|"
            r"kürzer|zusammenfass\w*", "length", "short"),
    Concept(r"详细|更长|长一点|扩写|展开|подробн\w*|длиннее|развернут\w*|más largo|mas largo|detallad\w*|"
            r"plus long|détaill\w*|mais longo|detalhad\w*|più lungo|dettagliat\w*|esaustiv\w*|allungand\w*|"
            r"ausführlich\w*|länger", "length", "long"),
    Concept(r"列表|分点|表格|提纲|大纲|списк\w*|по пунктам|таблиц\w*|lista|viñetas|tabla|liste|tableau|tabela|"
            r"elenco|tabelle", "format", "structured"),
    Concept(r"段落|一段|абзац\w*|párrafo|parrafo|paragraphe|parágrafo|paragrafo|absatz", "format", "prose"),
    Concept(r"正式|书面|официальн\w*|формальн\w*|formal(?:e|mente)?|formel(?:le)?|förmlich", "register", "formal"),
    Concept(r"口语|通俗|简单易懂|非正式|неформальн\w*|простым языком|informal|informel(?:le)?|"
            r"informale|locker", "register", "casual"),
    Concept(r"例子|举例|示例|пример(?:ы|а|ом|ов)?|ejemplo\w*|exemple\w*|exemplo\w*|esempi\w*|beispiel\w*", "examples", "yes"),
]
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
CONCEPTS_COMPILED = [(re.compile(rf"(?<![\w-])(?:{alternative})(?![\w-])"), c)
             for c in CONCEPTS for alternative in _alternatives(c.pattern)]
CONCEPTS_COMPILED += [(re.compile(alternative if _CJK.search(alternative) else rf"(?<![\w-])(?:{alternative})(?![\w-])"), c)
              for c in FOREIGN for alternative in _alternatives(c.pattern)]

# ---------------------------------------------------------------- counts

_NUMBER_WORDS = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "couple": 2, "three": 3, "few": 3,
                 "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "twelve": 12,
                 "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60,
                 "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "several": 4, "half": 0.5}
_UPPER = ("under", "below", "less than", "fewer than", "no more than", "not more than", "at most", "max",
          "maximum", "up to", "within", "not over", "not go over", "go over", "shorter than", "tops")
_LOWER = ("over", "more than", "at least", "minimum", "min", "no less than", "longer than")
_N = r"\d+(?:[.,]\d+)?|" + "|".join(_NUMBER_WORDS)
_COUNT = re.compile(
    rf"(?P<bound>{'|'.join(sorted(_UPPER + _LOWER, key=len, reverse=True))}|about|around|roughly|approximately|"
    rf"approx|~|like|maybe|some|aim for|exactly|just|only)?\s*(?:a\s+)?(?P<n>{_N})"
    rf"(?:\s*(?:-|to|or|and)\s*(?P<m>{_N}))?(?:ish)?\s*(?:\+|or so)?\s*(?:of\s+)?(?:a\s+)?"
    rf"(?:(?:solid|good|decent|normal|full|short|long|complete|little|proper|single|whole|quick)\s+)?"
    rf"(?P<unit>words?|sentences?|lines?|paragraphs?|pages?|characters?|chars?)(?![\w-])"
    rf"(?P<after>\s*(?:max(?:imum)?|minimum|min|or (?:less|fewer)|or more|at most|at least|tops|or so|ish))?")
_BETWEEN = re.compile(rf"between\s+(?P<n>{_N})\s+and\s+(?P<m>{_N})\s+(?P<unit>words|sentences|lines|characters)")


def _number(token: str | None) -> float | None:
    if token is None:
        return None
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return _NUMBER_WORDS.get(token)


def _band(words: float) -> str:
    return "short" if words <= SHORT_MAX_WORDS else "medium" if words <= MEDIUM_MAX_WORDS else "long"


def count_length(sentence: str, answer_words: int | None = None) -> list[tuple[str, int, int, str]]:
    """(length value, start, end, bound: "upper", "lower" or "") of every count of words, sentences, lines, paragraphs,
    pages or characters in a sentence, read with its bound against the length bands."""
    found = []
    for match in _BETWEEN.finditer(sentence):
        unit = match["unit"].rstrip("s")
        found.append((_band((_number(match["n"]) + _number(match["m"])) / 2 * WORDS_PER[unit]),
                      match.start(), match.end(), ""))
    for match in _COUNT.finditer(sentence):
        n, m = _number(match["n"]), _number(match["m"])
        if n is None or any(s <= match.start() < e for _, s, e, _ in found):
            continue
        unit = match["unit"].rstrip("s")
        unit = "character" if unit.startswith("char") else unit
        per = WORDS_PER[unit]
        bound, after = (match["bound"] or "").strip(), (match["after"] or "").strip()
        if unit == "paragraph" and match["n"] in ("a", "an") and not bound and re.search(
                r"\b(?:as|in|into)\s*$", sentence[:match.start()]):
            continue  # "as a paragraph" is a format, not a length
        low, high = (n, n) if m is None else (min(n, m), max(n, m))
        kind = ""
        if bound in _UPPER or after in ("max", "maximum", "or less", "or fewer", "at most", "tops"):
            words, kind = high * per - 1, "upper"
        elif bound in _LOWER or after in ("minimum", "min", "or more", "at least"):
            words, kind = low * per + 1, "lower"
        else:
            words = (low + high) / 2 * per
        if unit == "paragraph" and high >= 2:
            words = max(words, MEDIUM_MAX_WORDS + 1)  # several paragraphs are a long answer
        value = _band(words)
        if answer_words and unit in ("word", "character") and not kind and value != "medium":
            # "in 200 words" after a 500-word answer asks for a shorter one, whatever the band
            value = "short" if words < 0.7 * answer_words else "long" if words > 1.4 * answer_words else value
        found.append((value, match.start(), match.end(), kind))
    bare = re.match(r"\s*(?:make|do|write|rewrite|keep|cut|expand|shorten|reduce)\s+(?:it|this|that)\s+"
                    r"(?:to\s+|in\s+|into\s+)?(\d{2,5})\s*$", sentence)
    if bare and answer_words and not found:
        words = float(bare.group(1))
        value = "short" if words < 0.7 * answer_words else "long" if words > 1.4 * answer_words else None
        if value:
            found.append((value, bare.start(1), bare.end(1), ""))
    return found


