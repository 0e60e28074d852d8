"""The `rules` follow-up backend: cue phrases and re-asking, no model, for WildChat scale.

A user's next message shows what they thought of the answer in a few surface forms that recur
across chat logs (Don-Yehiya et al. 2024, "Learning from Naturally Occurring Feedback"; Petrak
et al. 2023; Shi et al. 2024, "WildFeedback"): the request asked again, often with a constraint
added ("... at least 5 pages") or after a refusal; a revision aimed at the answer ("make it
shorter", "try again"); a negation that gives the fix ("no, X is Y": correction) or does not
(complaint); errors pasted back after code; a question about the answer (clarification);
thanks (positive). Everything else is a new request: so are "continue" and translations ("in
Spanish"), unless the answer came in another language than the request.

Cues (English, Chinese, Russian, Spanish, French, German, Portuguese) are looked for near the
start of the message: feedback leads with it, while a long message that merely contains
"rewrite" or "error" is usually a new task with pasted material. Re-asking is word overlap
(character bigrams for CJK), so it works in any language. Confidences are fixed per rule.
"""
from __future__ import annotations

import re
from functools import lru_cache

from actors.cue_matcher import ASCII_WORDS, CJK, Cues, cue_keys

# The names `explain_followup` gives the rule that decided (the learned backend's features).
RULE_NAMES = ("empty", "thanks", "error-pasted", "negation", "fix", "broken", "error-reported", "repeat",
              "repeat-narrowed", "repeat-with-constraint", "repeat-after-refusal", "wrong-language",
              "translation", "revision", "question-about-answer", "you-did", "pushback-after-refusal", "default")
SHORT = 300        # a follow-up this long (characters) can be a bare revision request
HEAD = 160         # longer ones must lead with their feedback
CUT = 800          # error scans read this much of a message
OVERLAP_CUT = 2000  # re-ask overlap reads this much (a template's slot can come late)
WORD = re.compile(r"\w+")
CONTENT_WORD = re.compile(r"\w{3,}")


def _start(words: str, cjk: str) -> re.Pattern:
    """Cues that must open the message (after punctuation)."""
    return re.compile(rf"^[\W_]*(?:(?:{words})(?!\w|-\w)|(?:{cjk}))")


# Cue families: English first, then Russian, Spanish, French, German, Portuguese; CJK apart.
THANKS = _start(
    r"thanks?(?: you| u| a lot| so much)?|thx|ty|much appreciated|appreciate it|great|perfect|"
    r"awesome|excellent|nice|cool|good job|well done|amazing|wonderful|brilliant|fantastic|"
    r"love it|i like it|good|ok|okay|got it|(?:that'?s|this is|it'?s) (?:great|perfect|awesome|"
    r"helpful|good|nice|exactly what i)|спасибо|благодарю|отлично|супер|класс|хорошо|gracias|"
    r"perfecto|genial|excelente|merci|parfait|génial|danke|perfekt|prima|obrigad[oa]|valeu|"
    r"perfeito|ótimo", r"谢谢|感谢|多谢|太好了|很好|好的|不错|完美|ありがとう|감사|고마워")
THANKS_ANYWHERE = Cues(r"thanks?|thx|appreciate|спасибо|gracias|merci|danke?|obrigad[oa]",
                       r"谢谢|感谢|ありがとう|감사")
# What may follow thanks in a message that is only thanks. Each word sequence parses one way
# ('this is' is 'this' then 'is'; it was once an alternative of its own, and 'thanks this is
# this is ... x' took seconds) and the loop is possessive, so a near miss fails in linear time.
FILLER = re.compile(
    r"^[\W_\d]*(?:(?:so much|a lot|very much|again|man|bro|buddy|dude|chatgpt|gpt|mate|sir|"
    r"that'?s|it'?s|is|was|very|really|great|good|helpful|perfect|nice|awesome|amazing|"
    r"work(?:s|ed)?|answer|response|help|for|the|your|you|it|that|this|and|enough|all|i see|"
    r"understood|alright|i need(?:ed)?|beaucoup|mucho|muchas|vielen|большое|muito|много)"
    r"\b[\W_]*)*+$")
# A verdict that opens the message: correction if content follows, else complaint.
NEGATION = _start(
    r"no(?! (?:problem|worries|need|doubt|thanks|matter|way)\b)|nope|nah|wrong|incorrect|not quite|not really|not exactly|actually,? (?:it|that|this|"
    r"the|you|there)|(?:that'?s|this is|it'?s|you'?re|you are) (?:wrong|incorrect|not (?:right|"
    r"true|correct))|нет|неправильно|неверно|не так|не то|no es|está mal|incorrecto|non|"
    r"c'est faux|faux|nein|falsch|stimmt nicht|não|errado|incorreto",
    r"不对|不是|错了|不正确|不行|違う|아니")
# A fix stated outright: correction.
FIX = Cues(
    r"i (?:said|meant|mean|asked for|asked you|told you|wanted|was asking|specified)|what i (?:mean|meant)|"
    r"(?:it|that|this|"
    r"there|answer) should (?:be|have)|should be \S+ not|you (?:misunderstood|misread|got (?:it|"
    r"that|this) wrong|mixed up|confused|made a (?:mistake|typo|error)|forgot|missed|left out|"
    r"skipped|ignored)|(?:is|are|was|were|it'?s|they'?re) (?:a |an |the )?\w+(?: \w+)?,? "
    r"not(?! to\b)|instead of|by mistake|(?:is|are|was|were|it'?s|has been) already|already "
    r"(?:out|released|exists?|happened|done|included)|"
    r"я (?:сказал|просил|имел в виду|имею в виду)|ты (?:ошибся|забыл|перепутал)|dije|quise decir|quiero decir|"
    r"te pedí|j'ai dit|je voulais|je veux dire|ich sagte|ich meinte|ich meine|eu disse|eu quis dizer|ik bedoel",
    r"我说的是|我要的是|我的意思是|应该是|你搞错|你忘了|漏了")
# The user telling the assistant what it did, or that it is wrong (when not asking).
YOU_DID = Cues(
    r"you (?:gave|wrote|made|used|listed|put|added|included|did|said|mentioned|changed|removed|"
    r"repeated|copied|keep|still|only|just|should have|should ?n'?t)|your (?:answer|response|"
    r"code|list|output|example)s? (?:is|are|was|were|does|did|has|have)|wrong|mistake|"
    r"incorrect|inaccurate|неверно|неправильн\w*|ошиб\w*|ты (?:дал|написал|сделал|использовал)|"
    r"incorrecto|te equivocaste|faux|tu t'es trompé|falsch|du hast|errado|incompleto",
    r"你(?:给|写|用|说)的|错|不对")
# The answer failed, is doubted or disliked, with no fix given: complaint.
BROKEN = Cues(
    r"(?:doesn'?t|does not|didn'?t|did not|isn'?t|is not|won'?t|not|still not|still doesn'?t|"
    r"can'?t|cannot) (?:work|working|run|running|compile|compiling|load|loading|display|show|"
    r"open|help)|not what i (?:asked|wanted|meant|need|said)|that'?s not (?:it|what)|you "
    r"(?:didn'?t|did not|don'?t|do not|never) (?:answer|understand|follow|listen|read|finish|"
    r"complete|do (?:it|what|as))|(?:doesn'?t|does not) (?:make sense|answer)|makes no sense|"
    r"nonsense|useless|irrelevant|stupid|dumb|terrible|awful|horrible|rubbish|garbage|(?:same|"
    r"got|getting|gives?|throws?|shows?) (?:an? )?(?:error|exception|problem|issue|result|"
    r"answer)|incomplete|unfinished|cut off|you stopped|where(?:'s| is) the rest|are you sure|"
    r"double.?check|check again|really\?|still (?:wrong|the same|too|getting|get|has|have|"
    r"shows?|not|missing|empty|nothing|broken|failing|crashing|happening)|nothing (?:happens|happened|changed|"
    r"changes|shows|appears|works|is (?:shown|displayed|happening))|no (?:change|difference|effect)|"
    r"(?:doesn'?t|does not|didn'?t|did not) (?:change|do anything|fix|solve|seems? to work)|same (?:result|output|problem|"
    r"issue|thing|error)|still (?:doesn'?t|does not|isn'?t|is not|can'?t|cannot|won'?t|looks?|seems?)|"
    r"(?:you|u) (?:rly |really )?sure|too (?:long|short|formal|informal|simple|complex|complicated|generic|vague|"
    r"much|many|few|little|repetitive|wordy|robotic|boring)|not (?:enough|good|helpful|"
    r"correct|right|true|accurate)|"
    r"не работает|ошибк\w*|выда[её]т|не запускается|не помогло|ты уверен|"
    r"no funciona|da error|no sirve|estás seguro|ne (?:marche|fonctionne) pas|erreur|es-tu sûr|"
    r"funktioniert nicht|geht nicht|fehler|bist du sicher|não funciona|dá erro|tem certeza",
    r"报错|出错|错误|运行不了|不能用|没用|无法运行|还是不行|太长|太短|不好|你确定|エラー")
# Failure words: a report on code or commands the answer gave.
ERROR = Cues(r"error|exception|bug|crash(?:es|ed)?|fail(?:s|ed|ing)?|broken|warning|"
             r"disappear(?:s|ed)?|ошибк\w*|erreur|fehler", r"报错|出错|错误|エラー")
TRACEBACK_HINTS = ("error", "exception", "traceback", "fault", "undefined", "not defined",
                   "no attribute", "unexpected", "not found", "no module", "not recognized",
                   "uncaught", "cannot find", "cannot be applied", "cannot resolve", "incompatible types",
                   "is not a function", "cannot read propert", "cannot convert", "exit code", "unmet",
                   "event not found", "permission denied", "no such file", "cannot write", "could not",
                   "failed to")
TRACEBACK = re.compile(  # text pasted from a compiler, interpreter or console
    r"traceback \(most recent call last\)|^\s*file \"[^\"]+\", line \d+|"
    r"\b\w*(?:error|exception)\b\s*:|\berror\s*(?:c|cs|ts|lnk)?\d{3,5}\b|uncaught|"
    r"segmentation fault|undefined reference|cannot find symbol|is not defined|"
    r"has no attribute|unexpected token|command not found|no module named|not recognized as|"
    r"cannot be applied to|cannot resolve (?:symbol|method)|incompatible types|cannot convert|"
    r"is not a function|cannot read propert(?:y|ies)|exit(?:ed)? (?:with )?code [1-9]|unmet dependencies|"
    r"event not found|permission denied|no such file or directory|cannot write|could not (?:find|load|open|"
    r"resolve|connect)|failed to (?:build|load|compile|connect|open|install|start)",
    re.MULTILINE)
CODE = re.compile(r"^\s*(?:def |class |import |from \S+ import|#include|public |function |"
                  r"const |let |var |select |pip |npm |sudo |<\w+)|[;{}]\s*$",
                  re.MULTILINE | re.IGNORECASE)
# An answer that declines: the user's next attempt at the request is a re-ask.
REFUSAL_START = _start(r"i'?m sorry|i apologi[sz]e|sorry|as an ai|unfortunately|извините|"
                       r"к сожалению|lo siento|désolé|es tut mir leid|desculpe", r"抱歉|对不起|很抱歉")
REFUSAL = Cues(r"(?:i'?m|i am) (?:not able|unable) to|i (?:cannot|can'?t|won'?t) (?:help|assist|"
               r"provide|create|generate|write|fulfill|comply|do)|against (?:my|the|openai'?s?) "
               r"(?:guidelines|polic\w+)|я не могу|no puedo|je ne peux pas|ich kann nicht|"
               r"não posso", r"我(?:不能|无法)")
REFUSAL_HINTS = ("able", "not", "n't", "won", "against", "не мог", "no puedo", "ne peux",
                 "kann nicht", "não posso", "我")
# An answer that declines for want of input ("please provide the text") invites the
# material, not a push back: the reply is a new request.
ASKS_FOR_INPUT = re.compile(
    r"\b(?:provide|share|specify|clarify|give me|send)\b|more (?:context|information|details)|"
    r"proporcion|especifi|fournir|précis|предостав|уточни|提供|具体")
# A revision aimed at the answer just given.
REVISE = Cues(
    r"make (?:it|this|that|them|these|those|the \w+|your \w+|each \w+) (?:more|less|a bit|"
    r"a little|little|much|even|way|so|very|really|sound|look|\w+er|short|long|simple|clear|concise|"
    r"detailed|formal|casual|professional|funny|catchy|neat|readable|human|natural|better)|"
    r"(?:add|include|insert|put|remove|delete|drop|change|replace|rewrite|modify|edit|update|specify|"
    r"adjust|mention) [^.?!\n]{0,80}?\b(?:to|in|into|from|of|on) (?:the |this |that |your )?(?:above|"
    r"previous|last|same|answer|response|code|text|list|agreement|contract|essay|story|email|letter|"
    r"script|table|plan|article|post|poem|song|function|program|paragraph|section|document|report)|"
    r"in (?:the|your) (?:above|previous|last) \w+|(?:rewrite|rewriter|revise|redo|rephrase|reword|rework) "
    r"(?:but|with|about|bout|in|as|so|to|for|using|without|and|like)|make (?:it|this|that|them) [^.?!\n]{1,40}$|"
    r"(?:the )?same (?:as above|as before|thing|but|with|"
    r"again)|same as (?:above|before)|start over|from scratch|once more|"
    r"shorter|longer|simpler|briefer|funnier|"
    r"catchier|clearer|more (?:concise|detail(?:ed|s)?|formal|informal|professional|casual|"
    r"specific|examples?|words|creative|funny|simple|natural|human|engaging|persuasive|"
    r"academic|polite|friendly|emotional|descriptive|variety|options|ideas|catchy)|(?:give|"
    r"show|list|generate|suggest)(?: me)? (?:\d+ |some |a few )?more|less (?:formal|wordy|words|"
    r"detail(?:ed)?|technical|complex|repetitive)|in (?:more|less|greater) detail|(?:expand|"
    r"elaborate) on (?:it|this|that|your)|(?:summari[sz]e|paraphrase|rephrase|reword|rewrite|"
    r"redo|revise|regenerate|fix|correct|improve|polish|change|modify|edit|adjust|update|"
    r"shorten|expand|simplify|reformat) (?:it|this|that|them|your|again|the above|the previous|"
    r"the last)|rephrase|reword|redo|regenerate|try again|again|one more time|another (?:one|"
    r"version|way|option|answer|response|try|variant|attempt)|different (?:one|version|way|"
    r"answer|approach|style|tone|ending)|instead|rather than|without (?:the|using|any)|"
    r"(?:don'?t|do not) (?:use|include|add|write|mention|say|make|give|start)|(?:add|include|"
    r"remove|delete|replace|exclude) (?:it|this|that|them|also)|only (?:use|give|write|show|"
    r"output)|(?:just|directly|simply) (?:do|give|output|write|show|apply|provide)|keep (?:it|"
    r"the)|at least \d+|(?:no more|less|more|fewer) than \d+|(?:in|with|into|as) (?:a )?(?:table|"
    r"list|bullet points?|json|markdown)|\d+ (?:words|pages|paragraphs|sentences|lines|"
    r"characters|points|items)|"
    r"короче|покороче|подробнее|длиннее|переделай|перепиши|измени|исправь|еще раз|ещё раз|"
    r"другой вариант|добавь|убери|замени|сократи|"
    r"más (?:corto|largo|detallado|formal)|resum\w* más|hazlo|otra vez|de nuevo|reescribe|cámbialo|agrega|añade|"
    r"quita|plus (?:court|long|détaillé)|encore|réécris|refais|reformule|ajoute|enlève|kürzer|"
    r"länger|ausführlicher|nochmal|noch einmal|schreib(?:e)? (?:es|das) um|füge|entferne|ändere|"
    r"mais (?:curto|longo|detalhado)|novamente|reescreva|adicione|remova|mude",
    r"短一点|短一些|简短|简洁|长一点|长一些|更长|更短|更详细|详细一点|具体一点|再来|重新|重写|再写|换一个|换个|"
    r"改成|改为|改一下|修改|加上|添加|增加|删除|去掉|不要|至少|字数|换成|改写|缩短|扩写|精简|简化|もっと")
# Asking for another language: a revision only if the answer came in another language than
# the request; otherwise a translation, which is a new task.
LANGUAGE = Cues(
    r"(?:in|into|to) (?:english|chinese|mandarin|russian|spanish|french|german|portuguese|"
    r"japanese|korean|arabic|italian|turkish|ukrainian|vietnamese|indonesian|persian|hindi|"
    r"polish|dutch)|translate|по-русски|на (?:русском|английском)|переведи|en (?:español|inglés|"
    r"français|anglais)|traduce|traduis|auf (?:deutsch|englisch)|übersetze|em (?:português|"
    r"inglês)|traduza", r"用(?:中文|英文|英语|汉语)|翻译|翻譯")
# A question about the answer itself.
CLARIFY = Cues(
    r"what do you mean|what does (?:it|that|this|this \w+|that \w+) mean|what is meant|what(?:'s|"
    r" is| are) (?:that|this|these|those)|why (?:did|do|would|is|are|was|does|didn'?t|not) "
    r"(?:you|it|that|this)|how (?:did|do|does|is) (?:you|it|that|this)|(?:can|could) you "
    r"(?:explain|clarify)|explain (?:it|this|that|what|why|how|more|further)|i (?:don'?t|"
    r"do not|didn'?t) (?:understand|get)|i'?m (?:confused|not sure what)|which one|where (?:did|"
    r"do) you get|how so|like what|such as|is (?:it|that|this) (?:true|correct|right|real|"
    r"the same)|что (?:ты имеешь|вы имеете) в виду|что (?:это )?значит|почему|не понял|объясни|"
    r"qué quieres decir|qué significa|por qué|no entiendo|que veux-tu dire|qu'est-ce que|"
    r"pourquoi|je ne comprends pas|was meinst du|was bedeutet|warum|ich verstehe nicht|"
    r"o que você quer dizer|o que significa|por que|não entendi",
    r"什么意思|为什么|怎么理解|不明白|不懂|是什么|どういう意味")
# A message that opens like a fresh request: not a bare statement about the answer.
REQUEST = _start(r"write|create|give|make|tell|generate|describe|explain|list|show|compose|draw|"
                 r"design|help|provide|suggest|please|now|what|how|who|where|when|can|could|"
                 r"напиши|создай|расскажи|escribe|dame|écris|donne|schreib|erstelle|escreva|"
                 r"crie", r"写|帮我|请|给我|生成")
WHY = _start(r"why|how come|почему|por qué|pourquoi|warum|por que", r"为什么")
QUESTION = re.compile(r"\?|？|^\W*(?:what|why|how|which|where|who|is|are|does|do|can|could)\b|"
                      r"吗|呢")
# Words that point back at the answer.
REFERS = Cues(
    r"it|this|that|these|those|them|above|previous|your|you|the (?:answer|response|text|essay|"
    r"story|poem|code|script|list|article|email|letter|paragraph|titles?|summary|sentences?|"
    r"version|one|last|first|second|table|function|program|message|reply|output|result|lyrics|"
    r"song|prompt|names?)|это|этот|выше|твой|ваш|esto|eso|anterior|ça|cela|précédent|das|es|"
    r"vorherige|isso|isto", r"这|它|上面|刚才|你")
# Words (and CJK characters) that make a repeated request a constrained re-ask.
CONSTRAINT_WORDS = frozenset(
    "more less longer shorter detailed detail details least most only without not dont words "
    "pages page paragraphs sentences lines simple simpler better again instead formal informal "
    "specific professional concise full complete entire whole correct properly exactly please "
    "подробнее больше меньше короче слов страниц только без más menos palabras plus moins mots "
    "mehr weniger wörter mais palavras".split())
CONSTRAINT_CHARS = frozenset("字页更详细短长再只不没多少")


@lru_cache(maxsize=256)  # a conversation's message is its next follow-up's request
def content_tokens(text: str) -> frozenset[str]:
    """Content words (3+ characters) plus character bigrams of CJK runs."""
    text = text[:OVERLAP_CUT].lower()
    if text.isascii():  # the common case, three times faster than the regex
        words = set(text.encode().translate(ASCII_WORDS).decode().split())
        return frozenset([w for w in words if len(w) > 2])
    runs = CJK.findall(text)
    if not runs:
        return frozenset(CONTENT_WORD.findall(text))
    toks = {t for t in CONTENT_WORD.findall(text) if not CJK.match(t)}
    for run in runs:
        toks.update(run[i:i + 2] for i in range(max(1, len(run) - 1)))
    return frozenset(toks)


@lru_cache(maxsize=16)
def has_code(answer: str) -> bool:
    """Whether the answer holds code or shell commands."""
    return "```" in answer or bool(CODE.search(answer[:CUT]))


def _latin(text: str) -> bool:
    """Whether a text is mostly in Latin script (its first 200 characters)."""
    sample = text[:200].lower()
    letters = sum(ch.isalpha() for ch in sample)
    return letters == 0 or 2 * sum("a" <= ch <= "z" for ch in sample) >= letters


def _about_answer(message: str, answer: str) -> bool:
    """Whether a message is built mostly from the answer's own words."""
    m = content_tokens(message)
    return len(m) >= 2 and len(m & content_tokens(answer[:CUT])) >= 0.5 * len(m)


def _asks_language(request: str) -> bool:
    """Whether a request names the language it wants its answer in."""
    head = request[:HEAD].lower()
    return bool(LANGUAGE.search(head, cue_keys(head)))


def refused(answer: str) -> bool:
    """Whether the answer opens by declining."""
    opening = answer[:300].lower()
    return bool(REFUSAL_START.match(opening) or (any(h in opening for h in REFUSAL_HINTS)
                                                 and REFUSAL.search(opening, cue_keys(opening))))


def _reask(previous_user: str | None, message: str, answer: str) -> tuple[str, float, str] | None:
    """The earlier request asked again: (nearly) all of it, or trimmed, or partly with words
    that constrain it, or partly after a refusal."""
    if not previous_user:
        return None
    p, m = content_tokens(previous_user), content_tokens(message)
    if len(p) < 2 or not m:
        return None
    kept, added, dropped = len(p & m) / len(p), m - p, p - m
    # A template reused with its slot filled anew swaps about as many words as it drops.
    swapped = dropped and len(dropped) / 2 <= len(added) <= len(dropped) + 2
    # Dropping a word from a short request changes it; from a long one, it trims it.
    if kept >= 0.85 and not swapped and (added or kept == 1 or len(p) >= 15):
        return "reattempt_feedback", 0.7, "repeat"
    if kept >= 0.5 and not swapped and len(p) >= 15 and len(p & m) >= 0.85 * len(m):
        return "reattempt_feedback", 0.65, "repeat-narrowed"
    if kept >= 0.6 and (added & CONSTRAINT_WORDS or any(t.isdigit() for t in added) and not swapped
                        or not CONSTRAINT_CHARS.isdisjoint("".join(added))):
        return "reattempt_feedback", 0.75, "repeat-with-constraint"
    if kept >= 0.3 and len(p) >= 3 and refused(answer):
        return "reattempt_feedback", 0.65, "repeat-after-refusal"
    return None


def explain_followup(previous_user: str | None, answer: str,
                     message: str) -> tuple[str, float, str]:
    """(label, confidence, name of the rule that decided): for debugging and tests."""
    text = (message or "").strip()[:CUT].lower().replace("\u2019", "'")
    answer = answer or ""
    if not text:
        return "new_request", 0.3, "empty"
    rest = text
    while thanks := THANKS.match(rest):  # "ok thanks, great!"
        rest = rest[thanks.end():]
    if rest is not text:
        if FILLER.match(rest[:200]):
            return "positive", 0.9, "thanks"
        text = re.sub(r"^[\W_]*(?:(?:but|however|now|just|also|and)\b[\W_]*)?", "", rest)
    short = len(text) <= SHORT
    head = text if short else text[:HEAD]
    keys = cue_keys(head)
    asks = bool(QUESTION.search(head))

    if any(h in text for h in TRACEBACK_HINTS) and TRACEBACK.search(text) and has_code(answer):
        return "complaint", 0.85, "error-pasted"
    negation = NEGATION.match(head)
    if negation:
        after = head[negation.end():]  # a verdict followed by content usually gives the fix
        if len(WORD.findall(after)) >= 2 or CJK.search(after) and len(after) > 3:
            return "correction", 0.8, "negation"
        return "complaint", 0.7, "negation"
    if FIX.search(head, keys) and "not what i" not in head:
        return "correction", 0.7, "fix"
    if BROKEN.search(head, keys) and (REFERS.search(head, keys) or len(text) <= 60 and not asks
                                      or has_code(answer)):
        return "complaint", 0.7, "broken"
    if short and ERROR.search(head, keys) and has_code(answer):
        return "complaint", 0.65, "error-reported"
    revise = REVISE.search(head, keys)
    statement = not asks and not REQUEST.match(head)
    if len(text) <= 80 and statement and not revise and THANKS_ANYWHERE.search(text, keys):
        return "positive", 0.7, "thanks"

    reask = _reask(previous_user, message, answer)
    if reask:
        return reask
    if short and LANGUAGE.search(head, keys):
        # The answer came in another script than the request, and the request had not
        # asked for a language itself: the user is pointing out the wrong language.
        if previous_user and _latin(previous_user) != _latin(answer) and not _asks_language(previous_user):
            return "reattempt_feedback", 0.7, "wrong-language"
        return "new_request", 0.6, "translation"
    # "Rewrite this: <pasted text>" is a new task: a revision brings no new material, or
    # quotes the answer back.
    if revise and (len(text) <= 150 or _about_answer(text, answer)):
        return "reattempt_feedback", 0.7 if REFERS.search(head, keys) else 0.55, "revision"
    if short and asks and (CLARIFY.search(head, keys) or (
            (WHY.match(head) or REFERS.search(head, keys)) and _about_answer(text, answer))):
        return "clarification", 0.6, "question-about-answer"
    if len(text) <= 150 and statement and YOU_DID.search(head, keys):
        return "correction", 0.55, "you-did"
    if short and statement and refused(answer) and not ASKS_FOR_INPUT.search(answer[:300].lower()):
        return "correction", 0.5, "pushback-after-refusal"
    return "new_request", 0.8 if len(text) > 40 else 0.6, "default"


def classify_followup(previous_user: str | None, answer: str,
                      message: str) -> tuple[str, float]:
    """Label one follow-up: (label, confidence in [0, 1]).

    `previous_user` is the user's request the answer responded to (None if none), `answer` the
    assistant answer, `message` the user's follow-up.
    """
    label, confidence, _ = explain_followup(previous_user, answer, message)
    return label, confidence


class RulesClassifier:
    """Batched `rules` backend: items are (previous_user, answer, message) tuples."""

    backend = "rules"

    def classify(self, items: list[tuple[str | None, str, str]]) -> list[tuple[str, float]]:
        """Label each follow-up; the order of the items is kept."""
        return [classify_followup(p, a, m) for p, a, m in items]
