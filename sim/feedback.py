"""What a simulated user says after an answer, and the follow-up label it has by construction.

Three kinds of feedback, the taxonomy's feedback labels (DESIGN.md): a re-attempt that asks
again with the constraint (`reattempt_feedback`), a correction that says what the answer has
and what was wanted (`correction`), and a bare complaint that names nothing (`complaint`).
Satisfied users thank (`positive`) or move on to a new request (`new_request`). The words
come from a phrasing bank (sim/phrasings.py): the `eval` family for the experiment's users,
the `dev` family where the extractor or the warm-start may see them. When an answer missed
two or more of the user's preferences, a re-attempt or correction names two of them at a
time (`TWO_PREFERENCES`), as real users often do.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sim.phrasings import Bank

LABELS = {"reattempt": "reattempt_feedback", "correction": "correction", "complaint": "complaint",
          "thanks": "positive", "new_request": "new_request"}
TWO_PREFERENCES = 0.35  # chance a message names two missed preferences when there are two


@dataclass(frozen=True)
class FollowUp:
    """One simulated user message after an answer, with its label and what it names."""

    text: str
    kind: str                         # reattempt, correction, complaint, thanks, new_request
    named: tuple[str, ...] = ()       # the properties the message names a wanted value of

    @property
    def label(self) -> str:
        """The follow-up label (actors.followup_labels.FOLLOWUP_LABELS) this message has by construction."""
        return LABELS[self.kind]


def feedback_message(kind: str, request: str, violated: dict[str, str], measured: dict[str, str],
                     rng: random.Random, bank: Bank) -> FollowUp:
    """Feedback of `kind` on an answer that missed `violated` (property -> wanted value);
    `measured` is what the answer has. Re-attempts and corrections name one violated
    preference, chosen at random, or two; a complaint names none, as bare complaints do."""
    if kind == "complaint":
        return FollowUp(rng.choice(bank.complaint), kind)
    if kind not in ("reattempt", "correction"):
        raise ValueError(f"unknown feedback kind {kind!r}; expected reattempt, correction or complaint")
    props = sorted(violated)
    two = len(props) >= 2 and rng.random() < TWO_PREFERENCES
    named = tuple(rng.sample(props, 2)) if two else (rng.choice(props),)
    first, second = named[0], named[-1]
    if kind == "reattempt":
        text = rng.choice(bank.reattempts(two)).format(
            request=request.rstrip(" .?!"), ask=rng.choice(bank.ask[violated[first]]),
            ask2=rng.choice(bank.ask[violated[second]]))
    else:
        text = rng.choice(bank.corrections(two)).format(
            want=rng.choice(bank.name[violated[first]]), got=rng.choice(bank.name[measured[first]]),
            want2=rng.choice(bank.name[violated[second]]))
    return FollowUp(text[0].upper() + text[1:], kind, named)


def thanks_message(rng: random.Random, bank: Bank) -> FollowUp:
    """A satisfied user's thanks."""
    return FollowUp(rng.choice(bank.thanks), "thanks")
