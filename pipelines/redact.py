r"""Redact identifiers and secrets (e-mail, phone, IP, card numbers, keys) from text.

Every conversation turn and persona passes through here before it goes downstream.
presidio-analyzer's pattern recognizers (WildChat itself was anonymised with Presidio) find
e-mails, IPs and cards; phonenumbers, the library behind Presidio's phone recognizer, finds
phones; detect-secrets' plugins find keys, tokens and private keys. All are far too slow for
whole multi-KB turns (phonenumbers: ~77 ms on 26 KB), so each kind sits behind cheap compiled
*trigger* regexes and its library only sees small windows around their hits.

Most turns hold nothing to redact, and `re` scanning every turn for every trigger was itself
most of the cost (the secret keywords' alternation on a lowercased copy above all). So
`Redactor.redact_many` first runs one *prefilter* per kind over the whole batch of texts
with pyarrow's RE2 kernels (a DFA, one C++ pass per kind; about a tenth of `re`'s time), and
a kind's triggers run only on the texts its prefilter matched. Each prefilter is a superset
of its kind's triggers, written with Unicode classes where `re` is Unicode-aware (`\d`,
`\w`, `\s`, case folding), so skipping a text never changes what is found
(tests/test_redact_corpora.py checks this on the bundled data, a generated corpus and edge cases).

The kinds themselves (prefilters, triggers, libraries) are in pipelines/redact_kinds.py and,
for phones, pipelines/redact_phone.py.
Nothing here touches the network (see `_email_detector` there; of detect-secrets only
`analyze_string` is used, never `verify`, which calls vendors' APIs).
"""
from __future__ import annotations

import bisect
import re
import time
from collections import Counter
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.redact_kinds import (Detector, Finding, Spans, credit_card_detector, email_detector, ip_detector,
                                    secret_detector)
from pipelines.redact_phone import phone_detector

REDACTION_KINDS: tuple[str, ...] = ("email", "phone", "ip_address", "credit_card", "secret")

# WildChat's own Presidio markers and ours: left exactly as they are, never counted.
_PLACEHOLDER = re.compile(r"<(?:PRESIDIO_ANONYMIZED|REDACTED)_[A-Z_]+>")
# Chinese, Japanese and Korean text runs into identifiers without a space ('我的邮箱是
# john@qq.com谢谢'), and `re`, Presidio and the boundary checks take its characters for
# word characters: the detectors see each such character as a space (offsets unchanged),
# and the replacement cuts the original text.
# Full-width digits, letters and '+()-.' are left as they are: numbers are written with them.
_CJK_RANGES = ((0x3000, 0x303F), (0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF),
               (0xF900, 0xFAFF), (0xFF01, 0xFF07), (0xFF0A, 0xFF0A), (0xFF0C, 0xFF0C), (0xFF1A, 0xFF1F),
               (0xFF61, 0xFFDC), (0x20000, 0x2FFFF))
_CJK = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "]")
_CJK_RE2 = "[" + "".join(f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in _CJK_RANGES) + "]"
# kind -> what builds its detector, in REDACTION_KINDS' order
BUILDERS = {"email": email_detector, "phone": phone_detector, "ip_address": ip_detector,
            "credit_card": credit_card_detector, "secret": secret_detector}


class Redactor:
    """Built once per process/actor (recognizers are costly to build); then called per text."""

    def __init__(self, kinds: Sequence[str] = REDACTION_KINDS) -> None:
        unknown = [kind for kind in kinds if kind not in REDACTION_KINDS]
        if unknown:
            raise ValueError(f"unknown redaction kind(s) {unknown}; allowed: {REDACTION_KINDS}")
        self._detectors = [BUILDERS[kind]() for kind in REDACTION_KINDS if kind in kinds]

    def detector_seconds(self, texts: Sequence[str]) -> dict[str, float]:
        """CPU seconds each kind spends finding its identifiers in `texts` as `redact_many`
        does (its prefilter over all, its detector on the texts that matched), one kind at a
        time (a profile; replacing the findings is left out)."""
        column, seconds = pa.array(texts, type=pa.large_string()), {}
        for detector in self._detectors:
            start = time.process_time()
            for text, hit in zip(texts, detector.prefilter_hits(column)):
                if hit:
                    detector.findings(text)
            seconds[detector.kind] = time.process_time() - start
        return seconds

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """Return the text with each found identifier replaced by a placeholder
        like "<REDACTED_EMAIL>" / "<REDACTED_PHONE>" / "<REDACTED_IP_ADDRESS>" /
        "<REDACTED_CREDIT_CARD>" / "<REDACTED_SECRET>", and counts per kind (only kinds
        with count > 0)."""
        return self.redact_many([text])[0]

    def redact_many(self, texts: Sequence[str]) -> list[tuple[str, dict[str, int]]]:
        """`redact` over many texts: each kind's prefilter runs once over all of them (RE2,
        vectorised), and a text meets only the detectors whose prefilter it matched."""
        if not texts:
            return []
        column = pa.array(texts, type=pa.large_string())
        matched = [detector.prefilter_hits(column) for detector in self._detectors]
        with_cjk = pc.match_substring_regex(column, _CJK_RE2).to_pylist()
        return [_redact(text, [d for d, hit in zip(self._detectors, matched) if hit[i]], with_cjk[i])
                for i, text in enumerate(texts)]


def _redact(text: str, detectors: list[Detector], with_cjk: bool = False) -> tuple[str, dict[str, int]]:
    scanned = _CJK.sub(lambda m: " " * len(m.group()), text) if with_cjk else text
    findings = [f for detector in detectors for f in detector.findings(scanned)]
    if not findings:
        return text, {}
    kept = _resolve_overlaps(findings, [m.span() for m in _PLACEHOLDER.finditer(text)])
    # Spans are disjoint and sorted, and pieces are cut from the original: no offset shifts.
    pieces, cursor = [], 0
    for finding in kept:
        pieces += [text[cursor:finding.start], f"<REDACTED_{finding.kind.upper()}>"]
        cursor = finding.end
    pieces.append(text[cursor:])
    return "".join(pieces), dict(Counter(f.kind for f in kept))


def _resolve_overlaps(findings: list[Finding], protected: Spans) -> list[Finding]:
    """Secrets first, then longest span first; drop anything touching a kept span or a
    placeholder. Returns the kept findings sorted by start."""
    findings.sort(key=lambda f: (f.kind != "secret", f.start - f.end, f.start))
    taken = sorted(protected)  # disjoint spans, so sorted by start is also sorted by end
    kept = []
    for f in findings:
        i = bisect.bisect_right(taken, (f.start, f.end))
        if (i > 0 and taken[i - 1][1] > f.start) or (i < len(taken) and taken[i][0] < f.end):
            continue
        taken.insert(i, (f.start, f.end))
        kept.append(f)
    return sorted(kept)
