"""Simulated users with hidden, checkable preferences.

Real logs cannot say whether the loop learns, because nobody knows what those users wanted.
These users' preferences are hidden from the pipeline but checkable:

- `profiles`: the properties, the hidden profiles and the deterministic checker;
- `answers`: synthetic answers with chosen property values (warm-start SFT data);
- `feedback`: what a user says after an answer, and its follow-up label by construction;
- `requests`: requests from the bundled WildChat sample's first turns and from templates;
- `warmstart`: the tiny warm-start policy, fine-tuned and cached on first use;
- `generate`: the interaction loop and the writers (`rlhi sim generate`).
"""
