"""The simulated users' phrasing banks, in two families written apart (data/sim/PHRASINGS.md).

- `dev`: what the persona extractor, the warm-start and unit tests may be written against;
- `eval`: what the experiment's users say by default, written in an independent pass by
  someone who never saw the extractor, and never used to tune anything.

A bank holds, per property value, clauses that ask for it (`ask`) and noun phrases that name
an answer having it (`name`); re-attempt and correction templates (some stating a second
preference); bare complaints; thanks; and free-form feedback messages with the preferences
each states (`messages`, for scoring the extractor). `load_bank` checks a bank's shape and
counts, so a bank that falls short fails at load, naming what is missing.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from sim.profiles import PROPERTIES

FOLDER = Path(__file__).resolve().parents[1] / "data" / "sim"
FAMILIES = ("dev", "eval")
VALUES = tuple(v for values in PROPERTIES.values() for v in values)
MIN_PER_VALUE, MIN_TEMPLATES, MIN_TWO_PREFERENCE_TEMPLATES = 15, 15, 5


@dataclass(frozen=True)
class Bank:
    """One family's phrasings."""

    family: str
    ask: dict[str, tuple[str, ...]]
    name: dict[str, tuple[str, ...]]
    reattempt: tuple[str, ...]
    correction: tuple[str, ...]
    complaint: tuple[str, ...]
    thanks: tuple[str, ...]
    messages: tuple[tuple[str, dict[str, str]], ...]

    def reattempts(self, two: bool) -> tuple[str, ...]:
        """Re-attempt templates stating one preference ({ask}), or two ({ask} and {ask2})."""
        return tuple(t for t in self.reattempt if ("{ask2}" in t) == two)

    def corrections(self, two: bool) -> tuple[str, ...]:
        """Correction templates naming one wanted value ({want}), or two ({want2} too)."""
        return tuple(t for t in self.correction if ("{want2}" in t) == two)


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def check_bank(raw: dict, family: str, path: Path) -> list[str]:
    """What a bank lacks against data/sim/PHRASINGS.md; [] when it is complete."""
    problems = []
    for section in ("ask", "name"):
        for value in VALUES:
            have = len(raw.get(section, {}).get(value) or [])
            if have < MIN_PER_VALUE:
                problems.append(f"{section}.{value}: {have} phrasings, needs {MIN_PER_VALUE}")
    for section, allowed, second in (("reattempt", {"request", "ask", "ask2"}, "ask2"),
                                     ("correction", {"want", "got", "want2"}, "want2")):
        templates = raw.get(section) or []
        if len(templates) < MIN_TEMPLATES:
            problems.append(f"{section}: {len(templates)} templates, needs {MIN_TEMPLATES}")
        if sum(second in _fields(t) for t in templates) < MIN_TWO_PREFERENCE_TEMPLATES:
            problems.append(f"{section}: needs {MIN_TWO_PREFERENCE_TEMPLATES} templates using {{{second}}}")
        problems += [f"{section}: {t!r} uses {sorted(_fields(t) - allowed)}" for t in templates
                     if _fields(t) - allowed]
    for message in raw.get("messages") or []:
        bad = {p: v for p, v in (message.get("states") or {}).items() if v not in PROPERTIES.get(p, ())}
        if bad:
            problems.append(f"messages: {message.get('text')!r} states {bad}, not in {PROPERTIES}")
    return [f"{path} ({family}): {p}" for p in problems]


@lru_cache(maxsize=None)
def load_bank(family: str = "eval") -> Bank:
    """The phrasing bank of `family` ("dev" or "eval")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown phrasing family {family!r}; the families are {', '.join(FAMILIES)}")
    path = FOLDER / f"phrasings-{family}.yaml"
    raw = yaml.safe_load(path.read_text())
    problems = check_bank(raw, family, path)
    if problems:
        raise ValueError("phrasing bank incomplete:\n  " + "\n  ".join(problems))
    return Bank(family=family,
                ask={v: tuple(raw["ask"][v]) for v in VALUES}, name={v: tuple(raw["name"][v]) for v in VALUES},
                reattempt=tuple(raw["reattempt"]), correction=tuple(raw["correction"]),
                complaint=tuple(raw["complaint"]), thanks=tuple(raw["thanks"]),
                messages=tuple((m["text"], dict(m.get("states") or {})) for m in raw.get("messages") or []))
