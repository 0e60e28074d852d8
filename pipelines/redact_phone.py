"""The phone kind of redaction: candidates as people write numbers, then `phonenumbers`.

The Detector it builds runs like every other kind (pipelines/redact_kinds.py,
pipelines/redact.py); what is particular here is how few windows reach `phonenumbers`:
a candidate is a whole token shaped like a number someone gives (not a date, version,
range or table row), and each goes to the library only in the regions it can belong to.
"""
from __future__ import annotations

import re
from typing import Any

from pipelines.redact_kinds import _DIGITS_ONLY, _DOTTED_QUAD, _RE2_DIGIT, Detector, Spans, _inside_longer_number


def _is_plausible_phone(text: str, start: int, end: int) -> bool:
    # WildChat is code-heavy: a bare digit run (1681234567, 9876543210) is far more often a
    # timestamp, an id or a constant than a phone number; people who give a number write it
    # with separators or a +country code. phonenumbers also takes '192.168.1.100' for one.
    number = text[start:end]
    return not (_DIGITS_ONLY.fullmatch(number) or _DOTTED_QUAD.fullmatch(number)
                or _inside_longer_number(text, start, end))


# A number as people write one: '+' and 7-15 digits, or digit groups joined by one space,
# dash, dot or slash, the first group maybe in parentheses; a whole token (not inside a
# word, path, decimal, time, version or id). It starts with its first character so that
# `re` skips ahead to candidates; quantifiers are possessive, so a run that fails is not
# retried from its middle.
_PHONE_GROUP = r"(?:[ .\-/]\(?|\)[ \-]?)\d++"
_PHONE_CANDIDATE = re.compile(rf"""
    [+(\d] (?<![\w.,/\-#@$%&].)(?<!\d:.)           # a first character that starts a token
    (?=(?:[ .\-/()+]{{0,2}}\d){{6}})                 # seven or more digits in all
    (?: (?<=\+)\d{{7,15}}+                          # '+' and digits
      | (?:(?<=\()\+?+\d++|(?<=\+)\d++|(?<=\d)\d*+) (?:{_PHONE_GROUP})++ \)?+ )  # or groups
    (?![\w@]|[.,:/\-]\d)                           # and a last one that ends it
""", re.VERBOSE)
_DATE = re.compile(r"\d{4}([-/.])\d\d?\1\d\d?|\d\d?([-/.])\d\d?\2\d{2,4}")
_SPACED_DIGITS = re.compile(r"[\d ]+")
_LAST_GROUP = re.compile(r"[ .\-/()]+\d+\)?\Z")   # a candidate's last digit group, with its separator
_FIRST_GROUP = re.compile(r"\d+ (?=\S+\Z)")   # a first group spaced from a rest that holds no space


def _digits(text: str, start: int, end: int) -> int:
    return sum(map(len, _DIGITS_ONLY.findall(text, start, end)))
# Two numbers as long as each other, the second above the first: a range when both are
# round or the second is close ('3000-3005'); a phone's two halves are rarely either.
_RANGE = re.compile(r"\d+\s?-\s?\d+")
_ROUND_RANGE = re.compile(r"\d+00\s?-\s?\d+00")
# A line of numbers: only these characters (a digit among them, checked apart: `[...]*\d[...]*`
# backtracked over every split of a long line that failed, cubic in its length).
_NUMERIC_LINE = re.compile(r"[\d\s.,;:|()[\]{}+\-/]*")


def _is_phone_candidate(text: str, start: int, end: int) -> bool:
    """Worth asking phonenumbers about: 7-15 digits; without a '+', groups of at most 8
    digits and not a date, a dotted quad, a decimal, a version ('10.0.19045.2965') or a row of
    a table of numbers."""
    number = text[start:end]
    groups = _DIGITS_ONLY.findall(number)
    if not 7 <= sum(map(len, groups)) <= 15:
        return False
    if number.startswith(("+", "(+")):
        return True
    if _DATE.fullmatch(number.strip("()")) or _DOTTED_QUAD.fullmatch(number.strip("()")):
        return False
    if max(map(len, groups)) > 8 or ("." in number and (len(groups) < 3 or min(map(len, groups)) < 2)):
        return False  # phones written with dots have three groups or more, none of one digit
    if _RANGE.fullmatch(number) and len(groups[0]) == len(groups[1]):
        gap = int(groups[1]) - int(groups[0])
        if gap > 0 and (gap <= 10 ** (len(groups[0]) - 1) or _ROUND_RANGE.fullmatch(number)):
            return False  # '3000-4000 words', 'ports 3000-3005', '1995-2005': a range, not a phone
    return not (_SPACED_DIGITS.fullmatch(number) and _in_table_of_numbers(text, start, end))


def _in_table_of_numbers(text: str, start: int, end: int) -> bool:
    """True when the line holds only numbers and so does the line before or after it
    ('94 70 128 2114' in a pasted column): a table, not a number someone gives."""
    line_start, line_end = text.rfind("\n", 0, start) + 1, text.find("\n", end)
    line_end = len(text) if line_end < 0 else line_end
    if not _numeric_line(text, line_start, line_end):
        return False
    before_start = text.rfind("\n", 0, max(0, line_start - 1)) + 1
    after_end = text.find("\n", line_end + 1)
    after_end = len(text) if after_end < 0 else after_end
    return bool((line_start > 0 and _numeric_line(text, before_start, line_start - 1))
                or (line_end < len(text) and _numeric_line(text, line_end + 1, after_end)))


def _numeric_line(text: str, start: int, end: int) -> bool:
    return bool(_NUMERIC_LINE.fullmatch(text, start, end)) and _DIGITS_ONLY.search(text, start, end) is not None


def phone_detector() -> Detector:
    import phonenumbers
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    # Presidio's PhoneRecognizer runs phonenumbers' matcher once per region, for 8 regions,
    # over every window (~0.7 ms). Here a candidate goes to the matcher only in the regions
    # where a parse (~20 us) says it can be a number:
    # - with a '+', the country it names, if the number has a length that country's numbers
    #   have (leniency POSSIBLE): '+' and a country code say "phone number" even where the
    #   area code is unassigned ('+1 (756) 836-1112'), which Presidio half-redacted;
    # - without, each region PhoneRecognizer supports by default in which it is valid, with
    #   PhoneRecognizer's leniency (VALID: national prefix too, where the region needs one).
    default_regions = tuple(PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS)

    def parse(number: str, region: str | None) -> Any:
        try:
            return phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            return None

    def matcher_regions(number: str) -> list[tuple[str, Any]]:
        if number.startswith(("+", "(+")):
            parsed = parse(number.lstrip("("), None)
            if parsed is None or not phonenumbers.is_possible_number(parsed):
                return []
            return [(phonenumbers.region_code_for_country_code(parsed.country_code), phonenumbers.Leniency.POSSIBLE)]
        parsed = [parse(number, region) for region in default_regions]
        return [(region, phonenumbers.Leniency.VALID) for region, n in zip(default_regions, parsed)
                if n is not None and phonenumbers.is_valid_number(n)]

    def find_whole(text: str, lo: int, hi: int) -> Spans:
        start, end = max(0, lo - 1), min(len(text), hi + 1)  # the matcher checks the characters around
        spans = {(start + m.start, start + m.end) for region, leniency in matcher_regions(text[lo:hi])
                 for m in phonenumbers.PhoneNumberMatcher(text[start:end], region, leniency=leniency)}
        return [span for span in sorted(spans) if _is_plausible_phone(text, *span)]

    def find(text: str, lo: int, hi: int) -> Spans:  # [lo, hi) is one candidate
        # A candidate that ran into the next number ('+44 7911 123456 24/7') is no number as
        # a whole: its shorter heads are tried, while they keep 7 digits. One that ran into
        # the number before ('room 12 415-555-2671') is tried without its first group when
        # the rest is one token of 7 digits or more (a table row's groups are all spaced).
        spans, end = find_whole(text, lo, hi), hi
        while not spans and (last := _LAST_GROUP.search(text, lo, end)) and _digits(text, lo, last.start()) >= 7:
            end = last.start()
            spans = find_whole(text, lo, end)
        if not spans and (first := _FIRST_GROUP.match(text, lo, hi)) and _digits(text, first.end(), hi) >= 7:
            spans = find_whole(text, first.end(), hi)
        return spans

    # The candidate's first character and the six more digits its lookahead asks for.
    prefilter = rf"[+({_RE2_DIGIT}](?:[ .\-/()+]{{0,2}}{_RE2_DIGIT}){{6}}"
    return Detector("phone", prefilter, (_PHONE_CANDIDATE,), None, find, keep_hit=_is_phone_candidate)
