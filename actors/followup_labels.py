"""The follow-up taxonomy the FollowupClassifier role labels with (DESIGN.md, after
Don-Yehiya et al. 2024 and the paper's "re-attempt with feedback").

The first three labels carry feedback on the answer and feed user-guided rewrites.
"""
from __future__ import annotations

FOLLOWUP_LABELS = ("reattempt_feedback", "correction", "complaint",
                   "clarification", "positive", "new_request")
FEEDBACK_LABELS = frozenset(FOLLOWUP_LABELS[:3])
