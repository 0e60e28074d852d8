"""Reading the answer-style preferences a feedback message states, by its structure.

`read_preferences(text)` finds mentions of a preference concept (length, lists or prose,
tone, examples, how an answer ends) and reads each with the structure around it rather than
from a list of phrasings:
- negation scoped to what it governs: "no bullets", "stop giving me examples", "lose the
  slang", "no slang or contractions", "do not hold back on the detail" (twice turned), and
  verdicts after a mention ("a one-liner is not enough", "the examples are confusing");
- "too X" turns X around ("too formal"); comparatives keep their direction ("shorter",
  "less stiff", "more casual"); words that are themselves complaints about the answer
  ("wordy", "stiff", "choppy") hold whatever surrounds them;
- who says what: after "I wanted", "I asked for", "looking for" a mention is a wish; after
  "this is", "you gave me", "instead", "getting" it describes the answer, which the user
  did not want (for two-valued dimensions, the other value);
- a definite description ("the example about dogs is wrong") states no wish;
- a removal with a pronoun ("the examples confuse me, take them out") turns the last mention;
- counts of words, sentences, lines, paragraphs, pages or characters, with their bounds
  ("under 30 words", "at least a page", "60-80 words"), read against the length bands.
A message that states nothing returns nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from actors.preference_words import CONCEPTS_COMPILED as _CONCEPTS
from actors.preference_words import OPPOSITE, VALUES, Concept, count_length, normalize  # noqa: F401

# ---------------------------------------------------------------- the frame around a mention

# Negators, matched on the words right before a mention (fillers and other mentions may sit
# between them; "and" ends their reach), possibly chained: "do not" + "hold back on" = a wish.
_NEGATOR = re.compile(
    r"(?:^|\s)(?:no|not|non|without|never|skips|skipped|skipping|omit|omits|omitting|leaves out|leaving out|"
    r"stop|stop with|stop using|stop giving|stop adding|stop being|"
    r"stop writing|stop ending|stop sounding|quit|quit asking|skip|drop|lose|ditch|remove|delete|cut|cut out|"
    r"leave out|leave off|take out|get rid of|avoid|less|fewer|instead of|rather than|hate|no more|no need for|"
    r"no need to be|enough with|away with|hold back|hold back on|do not want|do not need|do not include|"
    r"(?:do|does|did) not (?:want|need|like|ask for|include|use|add|give|put|bother with|do)|never (?:wanted|asked for)|"
    r"do not|does not|did not|"
    r"is not|are not|should not|will not|would not|can not|not so|too many|too much|minus|except|"
    r"other than|not a|not an|not this|not that|not the|not any|nor|zero)$")
_FILLER = frozenset("""the a an any all some those these that this your my of with more so such much many me
be being at in on for just really even anymore extra little bit lot lots , - 's every time answer answers
reply response version one ones kind sort type something anything stuff thing things like suitable
appropriate written given same least""".split())
_DETERMINERS = frozenset("the any all those these your".split())
_AFTER_VERDICT = re.compile(
    r"^\W*(?:\w+\W+){0,3}?(?:is|are|was|were|will|would|does|do)\s+not\s+(?:enough|do|work|what i (?:want|"
    r"need|asked))|^\W*(?:\w+\W+){0,2}?(?:is|are|was|were|feels?|seems?|looks?|make (?:it|this)|makes? me)\s+"
    r"(?:\w+\s+)?(?:annoying|confusing|distracting|unnecessary|pointless|weird|overkill|cluttered|messy|"
    r"irritating|useless|redundant|too much|silly|cringe)|^\W*(?:\w+\W+){0,2}?(?:confuse|annoy|distract)|"
    r"^\s*out of it")
_TOO = re.compile(r"(?:^|\s)(?:too|overly|excessively)\s+$")
_CANCEL = re.compile(r"not mind|(?:is|are) (?:fine|ok|okay|good)\b|no problem")
_DEFINITE = re.compile(r"(?:^|\s)(?:the|your|these|those)\s+(?:\w+\s+){0,2}$")
_WISH_VERBS = re.compile(r"\b(?:want|wanted|need|needed|like|prefer|give|add|use|keep|make|put|include|show|"
                         r"with|as|into|would|please|could|can|should|asked|hoping|expecting|meant|said|"
                         r"looking|try|write|rewrite|redo|turn|let|to|get|cut|trim)\b")
# Who says what: a wish, or a description of the answer the user got.
_WISH_FRAME = re.compile(r"(?:^|\s)(?:i|we)\s+(?:wanted|want|asked for|asked|was hoping for|was hoping|hoped for|"
                         r"was expecting|expected|was looking for|meant|said|need|needed|would like|"
                         r"prefer|preferred)\b|(?:^|\s)(?:looking for|what i (?:wanted|asked for|need|meant)|"
                         r"i am after|i was after|give me|make it|please)\b")
_DESCRIBE_FRAME = re.compile(r"(?:^|,|\b(?:but|and|so|hmm|well|ok|okay|no|nope|yeah|now|still|because|since))\s*"
                             r"(?:this|that|it)\s+(?:is|was)\b|(?:^|\s)you\s+(?:gave|wrote|sent|"
                             r"made|used|went with|did)\b|(?:^|\s)(?:instead|getting|i got|i received|came out as|"
                             r"what i got)\b|(?:^|\s)why is (?:this|it|everything)\b")
_SENTENCE = re.compile(r"[^.;!?\n]+")
_PRONOUN_REMOVAL = re.compile(r"(?<![\w-])(?:take|get|cut|leave|drop|remove|lose|ditch|delete|kill|scrap|"
                              r"skip)\s+(?:it|them|that|those|these)(?:\s+(?:out|off|away))?(?![\w-])")
_DISLIKE = re.compile(r"(?<![\w-])(?:annoying|confusing|distracting|unnecessary|pointless|overkill|irritating)(?![\w-])")

# ---------------------------------------------------------------- reading a message

@dataclass(frozen=True)
class Mention:
    position: int
    end: int
    dimension: str
    value: str             # what the mention stands for, read in its frame
    strength: int          # 3 a count, "too X" or a complaint word; 2 a wish; 1 read off a negation or a description
    named: str             # the value the words themselves name ("examples" names yes)
    bound: str = ""        # counts: "upper", "lower" or ""


def _negations(before: str, spans: list[tuple[int, int]]) -> int:
    """How many negators govern a mention right after `before`. Walking back, fillers are
    skipped, and another mention only where "or", "nor", "and the" (or nothing) joins them
    ("no slang or contractions", "stop with the questions and the examples"); the first
    negator found counts, and so does each negator right before it ("do not" + "hold back
    on" + "the detail": two, a wish)."""
    end, joined, after = len(before), True, None
    while True:
        head = before[:end].rstrip()
        negator = _NEGATOR.search(head)
        if negator:
            break
        word = re.search(r"([\w'-]+|,)$", head)
        start = next((s for s, e in spans if e == len(head)), None)
        if start is not None and joined:
            end, joined, after = start, False, None
        elif word and (word.group(1) in ("or", "nor") or (word.group(1) == "and" and after in _DETERMINERS)):
            end, joined, after = word.start(), True, word.group(1)
        elif word and word.group(1) in _FILLER:
            end, joined, after = word.start(), joined and word.group(1) in _DETERMINERS, word.group(1)
        else:
            return 0
    flips, end = 1, negator.start()
    while (negator := _NEGATOR.search(before[:end].rstrip())) is not None:
        flips, end = flips + 1, negator.start()
    return flips


_CONTENT_AFTER = re.compile(r"\s+of\s+(?!(?:points|steps|items|bullets|tips|it|this|that|them|the answer|how)\b)"
                            r"(?:\w+\s+){0,2}\w+")
_CONTENT_BEFORE = re.compile(r"(?:reference|shopping|to-?do|word|song|play|reading|check|task|price|guest|"
                             r"\d+|truth|data|periodic)\s*$")
# Nouns an answer-style adjective may qualify ("a shorter answer", "a casual tone"); before
# any other noun the adjective is the content asked for ("a long flight", "a formal definition").
_ANSWER_NOUNS = frozenset("""answer answers reply replies response responses version versions explanation
explanations text texts one ones summary wording tone language style words sentences sentence paragraph
paragraphs writeup write-up output overview breakdown walkthrough form format way manner voice read register
dive note notes essay paper email letter report message post forms terms""".split())
_ADJECTIVES = frozenset("""short shorter shortest long longer lengthy lengthier brief briefer concise detailed
thorough comprehensive in-depth deep deeper extensive exhaustive quick full formal informal casual
professional academic serious friendly friendlier simple simpler polished official relaxed conversational
chatty""".split())
_CONTENT_VERB = re.compile(r"\s+(?:my|our|his|her|their|the following|this text|these|those)\b")
_FUNCTION_WORDS = frozenset("""and or but nor please pls enough than as so to with in on at for of by from
this that it is was be please too very really much more less next time instead again already though""".split())
_DOCUMENT = re.compile(r"\s+(?:\w+\s+)?(?:letter|email|e-mail|report|essay|paper|card|message|post|speech|"
                       r"document|memo|application|thesis|presentation)s?\b")
_INNER_NEGATION = re.compile(r"\b(?:no|not|without|never|zero)\b")


def read_sentence(sentence: str, offset: int, answer_words: int | None = None) -> list[Mention]:
    """Every mention in one sentence, with its value as the frame around it reads it."""
    found: list[Mention] = []
    for value, start, end, bound in count_length(sentence, answer_words):
        if _negations(sentence[:start], []) % 2:
            continue  # "not three lines": a count the user rejects says nothing exact
        if _frame(sentence[:start]) == "describe":
            if value != "medium":
                found.append(Mention(start, end, "length", OPPOSITE[("length", value)], 1, value))
        else:
            found.append(Mention(start, end, "length", value, 3, value, bound))
    taken = [False] * len(sentence)
    for mention in found:
        taken[mention.position:mention.end] = [True] * (mention.end - mention.position)
    # Every concept's matches, the longest first: "not too long" is medium, not "long".
    matches = sorted(((m, c) for pattern, c in _CONCEPTS for m in pattern.finditer(sentence)),
                     key=lambda mc: (-(mc[0].end() - mc[0].start()), mc[0].start()))
    chosen = []
    for match, concept in matches:
        if not any(taken[match.start():match.end()]):
            taken[match.start():match.end()] = [True] * (match.end() - match.start())
            chosen.append((match, concept))
    spans = [(m.position, m.end) for m in found] + [(m.start(), m.end()) for m, _ in chosen]
    for match, concept in sorted(chosen, key=lambda mc: mc[0].start()):
        mention = read_mention(sentence, match, concept, spans, found)
        if mention is not None:
            found.append(mention)
    return [Mention(m.position + offset, m.end + offset, m.dimension, m.value, m.strength, m.named, m.bound)
            for m in found]


def read_mention(sentence: str, match: re.Match, concept: Concept, spans: list[tuple[int, int]],
                 earlier: list[Mention]) -> Mention | None:
    """One concept mention read in its frame; None when it states no wish."""
    before, after = sentence[:match.start()], sentence[match.end():]
    start, end, dim = match.start(), match.end(), concept.dimension

    def made(value: str | None, strength: int) -> Mention | None:
        return None if not value else Mention(start, end, dim, value, strength, concept.value)

    turned = OPPOSITE.get((dim, concept.value))
    if dim in ("format", "examples") and _CONTENT_AFTER.match(after) or dim == "format" and _CONTENT_BEFORE.search(before):
        return None  # "a list of 100 streets", "examples of verbs", "a reference list": what to write, not how
    following = re.findall(r"[a-z][\w'-]*|[^\w\s]", after[:40])[:2]
    if dim == "length" and _CONTENT_VERB.match(after) and match.group() not in _ADJECTIVES:
        return None  # "tighten my essay intro": the user's text is the object, not the answer
    if (dim in ("length", "register") and match.group() in _ADJECTIVES and following
            and following[0].isalpha() and not _ANSWER_NOUNS & set(following)
            and following[0] not in _FUNCTION_WORDS | _FILLER):
        return None  # "a long flight", "a formal definition": content, not a wish about the answer
    # The same noun phrase as the mention before it ("a long, thorough answer"): read alike.
    previous = max((m for m in earlier if m.dimension == dim and m.end <= start), key=lambda m: m.end, default=None)
    gap = previous and [w for w in re.findall(r"[\w'-]+", before[previous.end:]) if w not in _FILLER | {"and", "or"}]
    if previous is not None and not gap and previous.named == concept.value and not concept.complaint:
        return made(previous.value, previous.strength)
    if concept.complaint:
        return made(concept.value, 3)
    if _TOO.search(before):
        return made(turned, 3)
    inner = concept.value == "question" and bool(_INNER_NEGATION.search(match.group()))
    flips = _negations(before, spans) + bool(_AFTER_VERDICT.search(after.split(",")[0])) + inner
    if _CANCEL.search(before[before.rfind(",") + 1:] + " " + after.split(",")[0]):
        flips = 0
    frame = _frame(before)
    if frame == "describe" and _DOCUMENT.match(after):
        frame = None  # "it is an official letter": what the answer is for
    if concept.context and re.search(r"(?:this|it|that) is\s+$|'s\s+$", before):
        frame = None  # "this is for work": what the answer is for, not what it is
    if not flips and frame is None and not concept.context and _DEFINITE.search(before) \
            and not _WISH_VERBS.search(before):
        return None  # "the example about dogs is wrong": the answer described, no wish
    value, strength = concept.value, 2
    if flips % 2:
        value, strength = turned, 1
    if frame == "describe":
        value, strength = (OPPOSITE.get((dim, value)) if value != "medium" else None), 1
    return made(value, strength)


def _frame(before: str) -> str | None:
    """"wish" or "describe": the latest frame opened before a mention in its clause."""
    before = before[before.rfind(",") + 1:]
    wish = [m.end() for m in _WISH_FRAME.finditer(before)]
    describe = [m.end() for m in _DESCRIBE_FRAME.finditer(before)]
    if not wish and not describe:
        return None
    return "wish" if max(wish, default=-1) > max(describe, default=-1) else "describe"


OWN_WORDS_CHARS = 300  # beyond this, a message is read up to where its pasted material begins


def own_words(text: str) -> str:
    """The user's own words of a message: a long message is usually an instruction followed by
    pasted material (a document, code, an error) whose words state no preference."""
    if len(text) <= OWN_WORDS_CHARS:
        return text
    head = text[:OWN_WORDS_CHARS]
    cut = min((i for i in (head.find("\n"), head.find(":"), head.find("\uff1a"), head.find("```")) if i > 0),
              default=-1)
    if cut > 0:
        return head[:cut]
    sentence = re.match(r"[^.!?\u3002]*[.!?\u3002]", head)
    return sentence.group() if sentence else head


def read_preferences(text: str, answer: str | None = None) -> list[tuple[str, str]]:
    """(dimension, value) for each preference `text` states, one value per dimension (the
    strongest reading, the latest on a tie; of a lower and an upper bound, the upper), in
    text order. `answer`, the answer the message reacts to, reads a bare word count that
    the bands read otherwise ("make it 200 words" after 500 words is shorter)."""
    normalized = normalize(own_words(text))
    mentions: list[Mention] = []
    for piece in _SENTENCE.finditer(normalized):
        sentence = piece.group()
        found = read_sentence(sentence, piece.start(), len(answer.split()) if answer else None)
        if not found and _PRONOUN_REMOVAL.search(sentence) and mentions:
            last = mentions[-1]  # "the examples are confusing. take them out."
            turned = OPPOSITE.get((last.dimension, last.named))
            if turned:
                mentions[-1] = Mention(last.position, last.end, last.dimension, turned, 2, last.named)
        elif found and _DISLIKE.search(sentence):
            found = [Mention(m.position, m.end, m.dimension, OPPOSITE.get((m.dimension, m.value), m.value), 2,
                             m.named) if m.strength == 2 else m for m in found]
        mentions += found
    best: dict[str, Mention] = {}
    for mention in sorted(mentions, key=lambda m: m.position):
        held = best.get(mention.dimension)
        if held is not None and held.bound == "upper" and mention.bound == "lower":
            continue
        if held is None or mention.strength >= held.strength:
            best[mention.dimension] = mention
    return [(m.dimension, m.value) for m in sorted(best.values(), key=lambda m: m.position)]
