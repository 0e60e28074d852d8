"""What a simulated user says after an answer, and the follow-up label it has by construction.

Three kinds of feedback, the taxonomy's feedback labels (DESIGN.md): a re-attempt that asks
again with the constraint (`reattempt_feedback`), a correction that says what is wrong with
the answer (`correction`), and a bare complaint that names nothing (`complaint`). Satisfied
users thank (`positive`) or move on to a new request (`new_request`). Several phrasings per
kind and per preference, written fresh rather than copied from the rules classifier's cue
lists, so scoring that classifier here measures how far its cues generalise.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

# How a user asks for a value ("please make it ...").
ASK = {
    "short": ["keep it to a few lines", "in under forty words", "brief please, a couple of sentences",
              "just the gist, quickly"],
    "medium": ["around a paragraph or two", "not too long and not too short",
               "a moderate amount of detail, maybe seventy words"],
    "long": ["go into real depth", "a thorough write-up, well over a hundred words",
             "with lots of detail, take your time"],
    "bullets": ["as bullet points", "formatted as a list", "broken into points with dashes"],
    "prose": ["as normal paragraphs, no lists", "in flowing text without bullets",
              "written out as prose"],
    "formal": ["in a professional tone", "keep the tone formal and neutral",
               "written like a report, no slang"],
    "casual": ["in a relaxed, chatty tone", "talk to me like a friend would",
               "loosen up the tone, be informal"],
    "with_example": ["with a concrete example", "and show me an example",
                     "include an example so I can see it"],
    "no_example": ["without any examples", "skip the examples", "no examples needed"],
    "question": ["and finish by asking me something", "end with a question for me",
                 "close with a question so we can continue"],
    "statement": ["and don't end on a question", "finish with a plain statement",
                  "no questions at the end"],
}
# How a user names the value it got or wanted ("I wanted ..., this is ...").
NAME = {
    "short": "something short", "medium": "a medium-length answer", "long": "a long, detailed answer",
    "bullets": "bullet points", "prose": "paragraphs", "formal": "a formal tone",
    "casual": "a casual tone", "with_example": "an example", "no_example": "no examples",
    "question": "a question at the end", "statement": "no question at the end",
}
REATTEMPT = ["{request} {ask}.", "One more go: {request} ({ask})", "Again please, {ask}.",
             "Could you redo it {ask}?", "Let's try once more, {ask}."]
CORRECTION = ["Hmm, I was after {want}, and this is {got}.", "This has {got}; I need {want}.",
              "Not quite: {want} please, not {got}.", "You went with {got}. I'd asked for {want}.",
              "Nope, {want}. This came out as {got}."]
COMPLAINT = ["Meh.", "This isn't what I was hoping for.", "Hmm, not great.", "That misses the mark.",
             "I don't like this one.", "Not helpful, honestly.", "Ugh, no."]
THANKS = ["Perfect, thank you!", "Great, exactly what I needed.", "Cheers, that helps a lot.",
          "Nice one, thanks.", "Brilliant, thanks so much."]
LABELS = {"reattempt": "reattempt_feedback", "correction": "correction", "complaint": "complaint",
          "thanks": "positive", "new_request": "new_request"}


@dataclass(frozen=True)
class FollowUp:
    """One simulated user message after an answer, with its label and what it names."""

    text: str
    kind: str                 # reattempt, correction, complaint, thanks, new_request
    named: str | None = None  # the property the message names, if any

    @property
    def label(self) -> str:
        """The follow-up label (actors.followup_labels.FOLLOWUP_LABELS) this message has by construction."""
        return LABELS[self.kind]


def feedback_message(kind: str, request: str, violated: dict[str, str], measured: dict[str, str],
                     rng: random.Random) -> FollowUp:
    """Feedback of `kind` on an answer that missed `violated` (property -> wanted value).

    Re-attempts and corrections name one violated preference, chosen at random; a complaint
    names none, as real bare complaints do.
    """
    if kind == "complaint":
        return FollowUp(rng.choice(COMPLAINT), kind)
    prop = rng.choice(sorted(violated))
    want = violated[prop]
    if kind == "reattempt":
        text = rng.choice(REATTEMPT).format(request=request.rstrip(" .?!"), ask=rng.choice(ASK[want]))
    elif kind == "correction":
        text = rng.choice(CORRECTION).format(want=NAME[want], got=NAME[measured[prop]])
    else:
        raise ValueError(f"unknown feedback kind {kind!r}; expected reattempt, correction or complaint")
    return FollowUp(text[0].upper() + text[1:], kind, prop)


def thanks_message(rng: random.Random) -> FollowUp:
    """A satisfied user's thanks."""
    return FollowUp(rng.choice(THANKS), "thanks")
