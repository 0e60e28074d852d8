r"""What each redaction kind looks for, and where (pipelines/redact.py runs them).

A kind is a `Detector`: an RE2 *prefilter* run over a whole batch of texts (a superset of its
triggers: RE2 reads \d, \w and \s as ASCII where `re` reads them as Unicode, so the
prefilters use the wider classes below), `re` *trigger* regexes run on the texts the
prefilter matched, and its library (presidio's recognizers, phonenumbers, detect-secrets)
run on small windows around the trigger hits. Libraries are imported when a detector is
built: presidio pulls in spaCy (~3.5 s). Phones, the most involved kind, are in
pipelines/redact_phone.py.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_DIGITS_ONLY, _DOTTED_QUAD = re.compile(r"\d+"), re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_SINGLE_DIGIT_QUAD = re.compile(r"\d(?:\.\d){3}")
_NUMBER_BEFORE, _NUMBER_AFTER = re.compile(r"\d[.,]\Z"), re.compile(r"[.,]\d")
_DOTTED_BEFORE, _DOTTED_AFTER = re.compile(r"\d\.\Z"), re.compile(r"\.\d")
_TOKEN_BEFORE, _TOKEN_AFTER = re.compile(r"\S{0,64}\Z"), re.compile(r"\S{0,64}")
_TOKEN_TAIL = re.compile(r"[\w\-+/=]*(?:\.[\w\-+/=]+)*")
_KEY_BLOCK_END = re.compile(r"-----END[A-Z0-9 ]*-----|\n[ \t]*\n|\Z")
_EMAIL_LEAD = re.compile(r"[^@]*[!#$%&'*/=?^`{|}~]")
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_SECRET_WINDOW = 400  # chars kept either side of a secret trigger on very long lines
_UNQUOTED_SECRET = re.compile(r"(?=[^\s]*[A-Za-z])(?=[^\s]*\d)[A-Za-z0-9_\-/+=!@#$%^&*.~]{8,}")
# A shell or .env assignment: an upper-case name, '=' without spaces, the rest of the line.
_ENV_ASSIGNMENT = re.compile(r"^[ \t]*(?:export[ \t]+)?([A-Z][A-Z0-9_]*)=([A-Za-z0-9_\-/+=!@#$%^&*.~]{8,})[ \t]*$", re.M)

Spans = list[tuple[int, int]]

# RE2 (the prefilters) reads \d, \w and \s as ASCII; `re` reads them as Unicode. These
# classes hold at least what `re`'s do, so a prefilter written with them matches wherever the
# `re` trigger does. \w is every character but ASCII's non-word ones (a Unicode letter class
# makes RE2's automaton tens of times slower).
_RE2_DIGIT = r"\p{Nd}"
_RE2_WORD = r"^\x00-\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f"   # inside [...]
_RE2_SPACE = r"\x{09}-\x{0d}\x{1c}-\x{1f}\x{85}\p{Z}"         # str.isspace(), inside [...]



class Finding(NamedTuple):
    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class Detector:
    """One kind: where to look (trigger regexes) and what its library finds there."""

    kind: str
    prefilter: str  # an RE2 pattern matching every text any trigger below matches (a superset)
    triggers: tuple[re.Pattern, ...]
    pad: int | None  # context chars around a trigger hit that the library needs; None: the hit alone
    find: Callable[[str, int, int], Spans]  # (text, lo, hi) -> spans in text coordinates
    # Run on the lowercased text: case-insensitive regexes are ~20x slower in `re`.
    lowercase_triggers: tuple[re.Pattern, ...] = ()
    whole_lines: bool = False  # windows are the lines holding a hit (detect-secrets is line-based)
    keep_hit: Callable[[str, int, int], bool] | None = None  # drops hits before they open a window

    def prefilter_hits(self, texts: pa.Array) -> np.ndarray:
        """Which of `texts` (an Arrow string array) the prefilter matches: the only texts
        `findings` can find anything in."""
        return pc.match_substring_regex(texts, self.prefilter).to_numpy(zero_copy_only=False)

    def findings(self, text: str) -> list[Finding]:
        hits = [m.span() for pattern in self.triggers for m in pattern.finditer(text)
                if self.keep_hit is None or self.keep_hit(text, *m.span())]
        if self.lowercase_triggers:
            lowered = text.replace("\u0130", "i").lower()  # 'İ' is the one char lower() widens
            hits += [m.span() for p in self.lowercase_triggers for m in p.finditer(lowered)]
        windows = hits if self.pad is None else _windows(text, sorted(hits), self.pad, self.whole_lines)
        return [Finding(start, end, self.kind) for lo, hi in windows for start, end in self.find(text, lo, hi)]



def _windows(text: str, hits: Spans, pad: int, whole_lines: bool) -> Spans:
    """Merged [lo, hi) windows of `pad` chars (or the whole line) around sorted trigger hits."""
    windows: Spans = []
    for start, end in hits:
        if whole_lines:  # clipped, so one minified 100 KB line does not cost 100 KB per plugin
            lo = max(text.rfind("\n", 0, start) + 1, start - _SECRET_WINDOW)
            line_end = text.find("\n", end)
            hi = min(len(text) if line_end < 0 else line_end, end + _SECRET_WINDOW)
        else:  # widened to whole tokens: half a number may look like a whole one to a library
            lo, hi = max(0, start - pad), _TOKEN_AFTER.match(text, min(len(text), end + pad)).end()
            lo -= len(_TOKEN_BEFORE.search(text, max(0, lo - 64), lo).group())
        if windows and lo < windows[-1][1]:
            windows[-1] = (windows[-1][0], max(hi, windows[-1][1]))
        else:
            windows.append((lo, hi))
    return windows


def _inside_longer_number(text: str, start: int, end: int, dots_only: bool = False) -> bool:
    """True for a match that continues a decimal or dotted run: '3.14159265358', '1.3.6.1.4'.
    With `dots_only` (an IP address) a comma beside it separates a list ('93.184.216.34,
    93.184.216.35', a CSV log); it does not continue the number."""
    before, after = (_DOTTED_BEFORE, _DOTTED_AFTER) if dots_only else (_NUMBER_BEFORE, _NUMBER_AFTER)
    return bool(before.search(text, max(0, start - 2), start) or after.match(text, end))


def _presidio_find(recognizer: Any, keep: Callable[[str, int, int], bool] | None = None
                   ) -> Callable[[str, int, int], Spans]:
    """Run a presidio recognizer on text[lo:hi]; spans come back in text coordinates."""
    def find(text: str, lo: int, hi: int) -> Spans:
        results = recognizer.analyze(text[lo:hi], recognizer.supported_entities, None)
        spans = [(lo + r.start, lo + r.end) for r in results]
        return [span for span in spans if keep is None or keep(text, *span)]
    return find


# Triggers start with a digit or a literal so that `re` skips ahead to candidates. Libraries
# are imported when a Redactor is built: presidio pulls in spaCy (~3.5 s).
def email_detector() -> Detector:
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # EmailRecognizer calls the module-level `tldextract.extract`, which downloads the public
    # suffix list on first use; this extractor reads only the snapshot bundled with tldextract.
    offline_extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    offline_extract("example.com")  # loads the snapshot now (~0.2 s), not on the first e-mail

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline_extract(pattern_text).fqdn != ""

    # presidio admits RFC's rare local-part characters (' = ` { / ...), so in code
    # "email='a@b.com" would lose its "email='" too: the address starts after the last one.
    find = _presidio_find(OfflineEmailRecognizer())

    def find_trimmed(text: str, lo: int, hi: int) -> Spans:
        leads = [(_EMAIL_LEAD.match(text, start, end), start, end) for start, end in find(text, lo, hi)]
        return [(lead.end() if lead else start, end) for lead, start, end in leads]

    # 128 chars either side covers a 64-char local part and most domains.
    return Detector("email", "@", (re.compile("@"),), 128, find_trimmed)


def _is_public_ip(text: str, start: int, end: int) -> bool:
    # Private, loopback and documentation addresses (127.0.0.1, 2001:db8::1) identify nobody
    # and fill code samples. A dotted quad inside a longer dotted run or of single digits is
    # a version or section number ('3.5.0.1'), or else a public resolver like 8.8.8.8.
    if _inside_longer_number(text, start, end, dots_only=True) or _SINGLE_DIGIT_QUAD.fullmatch(text, start, end):
        return False
    ip = ipaddress.ip_interface(text[start:end]).ip
    ip = getattr(ip, "ipv4_mapped", None) or ip   # '::ffff:93.184.216.34' is that IPv4 address
    # Only 2000::/3 is global unicast; Python calls 'a::b' (C++) global too.
    return ip.is_global and (ip.version == 4 or ip in _GLOBAL_UNICAST_V6)


def ip_detector() -> Detector:
    from presidio_analyzer.predefined_recognizers import IpRecognizer

    # A dotted quad, or the start of a global IPv6 address: a group starting 2 or 3, then
    # "::" or more groups ("2a00:1450::", "2001:db8:85a3:"); "std::" and "12:30:45" don't fire.
    trigger = re.compile(r"\d(?:\d{0,2}\.\d{1,3}\.\d{1,3}\.\d"
                         r"|(?<=[23])[0-9A-Fa-f]{0,3}:(?::|[0-9A-Fa-f]{1,4}:(?::|[0-9A-Fa-f]{1,4}:)))")
    prefilter = (rf"{_RE2_DIGIT}{{1,3}}\.{_RE2_DIGIT}{{1,3}}\.{_RE2_DIGIT}{{1,3}}\.{_RE2_DIGIT}"
                 r"|[23][0-9A-Fa-f]{0,3}:(?::|[0-9A-Fa-f]{1,4}:(?::|[0-9A-Fa-f]{1,4}:))")
    return Detector("ip_address", prefilter, (trigger,), 48, _presidio_find(IpRecognizer(), _is_public_ip))


def credit_card_detector() -> Detector:
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    # A whole run of 13-19 digits, maybe grouped by spaces or dashes; presidio's recognizer then
    # checks the issuer prefix (plus Mastercard's 2-series, 2221-2720, added here) and Luhn.
    trigger = re.compile(r"\d(?<!\d\d)(?:[ -]?\d){12,18}(?!\d)")
    prefilter = rf"{_RE2_DIGIT}(?:[ -]?{_RE2_DIGIT}){{12}}"
    two_series = Pattern("Mastercard 2-series", r"\b(2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720))[- ]?(\d{4})[- ]?"
                         r"(\d{4})[- ]?(\d{4})\b", 0.3)
    recognizer = CreditCardRecognizer(patterns=[*CreditCardRecognizer().patterns, two_series])
    return Detector("credit_card", prefilter, (trigger,), 2, _presidio_find(recognizer))


def secret_detector() -> Detector:
    from detect_secrets.filters import heuristic
    from detect_secrets.plugins import (aws, azure_storage_key, basic_auth, discord,
                                        github_token, gitlab_token, jwt, keyword, openai,
                                        private_key, pypi_token, sendgrid, slack,
                                        square_oauth, stripe, telegram_token)
    from detect_secrets.plugins.base import RegexBasedDetector

    class VendorTokens(RegexBasedDetector):
        """Tokens detect-secrets has no plugin for, by their documented shapes."""
        secret_type = "Vendor token"
        denylist = [re.compile(p) for p in (
            r"\bhf_[A-Za-z0-9]{34}\b",                 # Hugging Face
            r"\bgithub_pat_[A-Za-z0-9_]{82}\b",         # GitHub fine-grained
            r"\bAIza[0-9A-Za-z_\-]{35}(?![\w-])",       # Google API key
            r"\bsk-ant-[A-Za-z0-9_\-]{32,}")]          # Anthropic

    keyword_plugin, unquoted = keyword.KeywordDetector(), keyword.CONFIG_DENYLIST_REGEX_TO_GROUP
    plugins = [aws.AWSKeyDetector(), azure_storage_key.AzureStorageKeyDetector(),
               basic_auth.BasicAuthDetector(), discord.DiscordBotTokenDetector(),
               github_token.GitHubTokenDetector(), gitlab_token.GitLabTokenDetector(),
               jwt.JwtTokenDetector(), keyword_plugin, openai.OpenAIDetector(),
               pypi_token.PypiTokenDetector(), sendgrid.SendGridDetector(), slack.SlackDetector(),
               square_oauth.SquareOAuthDetector(), stripe.StripeDetector(),
               telegram_token.TelegramBotTokenDetector(), VendorTokens()]
    key_block = private_key.PrivateKeyDetector()
    # Triggers: each token plugin's fixed prefix, or its shape (basic-auth URL, Telegram and
    # Discord tokens); and the keyword plugin's denylist (or the AWS plugin's "aws") followed
    # by an assignment or a call, as in all its patterns ("secrets, and lies" does not fire).
    token_prefixes = re.compile("|".join(re.escape(prefix) for prefix in (
        "AKIA", "ASIA", "ABIA", "ACCA", "A3T", "AccountKey=", "ghp_", "gho_", "ghu_", "ghs_",
        "ghr_", "glpat-", "glptt-", "gldt-", "glrt-", "glcbt-", "glimt-", "glft-", "glsoat-",
        "glagent-", "gloas-", "GR1348941", "eyJ", "T3BlbkFJ", "pypi-", "SG.", "xox",
        "hooks.slack", "sq0csp-", "k_live_", "PRIVATE KEY", "PuTTY-User-Key",
        "hf_", "github_pat_", "AIza", "sk-ant-")))
    token_shapes = re.compile(r"://[^\s:/@]+:[^\s/@]+@|:[\w-]{35}|\.[\w-]{6}\.[\w-]{27}")
    denylist = "|".join(keyword.DENYLIST)
    keywords = re.compile(f"(?:aws|{denylist})" + r"\w*[\]'\"]{0,2}\s*[:=!(]")
    names_a_keyword = re.compile(denylist)
    # detect-secrets' own false-positive heuristics ('${DB_PASS}', '<password>', '*****',
    # 'abcdef'); a value with spaces is a prompt or a sentence ("Enter your password"); a
    # value naming a keyword is a placeholder ("YOUR_API_KEY", "password").
    false_positives = (heuristic.is_templated_secret, heuristic.is_prefixed_with_dollar_sign,
                       heuristic.is_sequential_string, heuristic.is_not_alphanumeric_string,
                       lambda secret: any(c.isspace() for c in secret),
                       lambda secret: names_a_keyword.search(secret.lower()) is not None)

    def find(text: str, lo: int, hi: int) -> Spans:
        line, spans = text[lo:hi], []
        for plugin in plugins:
            # Token plugins may stop short of the token (the JWT pattern stops before the
            # signature, the Stripe one after 24 chars): the token is taken to its end. A
            # keyword value is whole already and must not run into a neighbouring word.
            widen = isinstance(plugin, RegexBasedDetector)
            word_end = "" if widen else r"(?!\w)"
            for secret in set(plugin.analyze_string(line)):
                if any(is_false_positive(secret) for is_false_positive in false_positives):
                    continue
                for hit in re.finditer(rf"(?<!\w){re.escape(secret)}{word_end}", line):
                    end = _TOKEN_TAIL.match(text, lo + hit.end()).end() if widen else lo + hit.end()
                    spans.append((lo + hit.start(), end))
        # `.env`, YAML and ~/.aws/credentials assign without quotes ('api_key: ikk6Yv9pQz2L');
        # code does too ('if password == user_input:'), so an unquoted value counts only when
        # it looks like a secret: 8+ characters of a token's alphabet, letters and digits.
        for secret in set(keyword_plugin.analyze_string(line, denylist_regex_to_group=unquoted)):
            if _UNQUOTED_SECRET.fullmatch(secret) and not any(fp(secret) for fp in false_positives):
                for hit in re.finditer(rf"(?<!\w){re.escape(secret)}(?![\w/+=])", line):
                    spans.append((lo + hit.start(), lo + hit.end()))
        # Written as a shell or .env assignment ('export DB_PASSWORD=correcthorsebattery'),
        # which code seldom is, a value counts without digits too.
        for hit in _ENV_ASSIGNMENT.finditer(line):
            if names_a_keyword.search(hit.group(1).lower()) and not any(fp(hit.group(2)) for fp in false_positives):
                spans.append((lo + hit.start(2), lo + hit.end(2)))
        # The plugin reports only the "BEGIN RSA PRIVATE KEY" marker; the whole block goes,
        # up to its END line (or, for a truncated paste, the first blank line).
        for marker in key_block.analyze_string(line):
            for hit in re.finditer(re.escape(marker), line):
                start = lo + hit.start() - (5 if line.endswith("-----", 0, hit.start()) else 0)
                end = _KEY_BLOCK_END.search(text, lo + hit.end())
                spans.append((start, end.end() if end.group().startswith("-") else end.start()))
        return spans

    # In RE2: the prefixes as they are; the shapes with `re`'s \w; the keywords on the text
    # itself, case-folded, where 'İ' (which the triggers read as 'i') counts as an 'i'.
    word = f"(?:[{_RE2_WORD}]|-)"
    shapes = rf"://[^\s:/@]+:[^\s/@]+@|:{word}{{35}}|\.{word}{{6}}\.{word}{{27}}"
    folded = f"(?:aws|{denylist})".replace("i", r"(?:i|\x{130})")
    keyword_prefilter = rf"(?i:{folded}[{_RE2_WORD}]*[\]'\"]{{0,2}}[{_RE2_SPACE}]*[:=!(])"
    prefilter = "|".join((token_prefixes.pattern, shapes, keyword_prefilter))
    return Detector("secret", prefilter, (token_prefixes, token_shapes), 0, find,
                     lowercase_triggers=(keywords,), whole_lines=True)
