"""One conversation of the chat log as a row of WildChat's Hub schema.

Rows are WildChat's Hub schema exactly (serve/chat_log.py writes them with `SCHEMA` from
sim/generate.py, read from the bundled sample), so `ingest.inputs: [<folder>]` reads them back. What each field holds:
`conversation_hash` the conversation_id; `model` the policy id; `timestamp` the latest
turn's; `hashed_ip` the latest request's `user` as its `pseudonym` (a key that is not a hash
already is kept as its SHA-256; null without one: ingest then rejects the
row as missing_user); per turn: `content` redacted, `redacted` whether it was, `hashed_ip`
the user (user turns), `timestamp` when the request arrived (user turns) or the answer was
made (assistant turns); for assistant turns `header.user-agent` holds the **policy
version** that wrote the turn (WildChat leaves assistant headers null; null here when the
turn did not come from this server). System messages are not logged (WildChat rows have
none); `toxic` and the moderation lists are null (the server does not moderate);
`country`, `state` and user headers are null (the server records no network data).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol


class Redacts(Protocol):
    """What the writer needs of pipelines.redact.Redactor."""

    def redact_many(self, texts: list[str]) -> list[tuple[str, dict[str, int]]]: ...


@dataclass(frozen=True)
class ChatTurn:
    """One finished request/response pair of /v1/chat/completions, as the gateway saw it."""

    conversation_id: str
    user: str | None
    messages: list[dict]
    """The request's messages (role, content), ending with the user turn answered."""
    reply: str
    model: str
    """The policy id."""
    policy_version: str
    requested_at: datetime
    answered_at: datetime


@dataclass(frozen=True)
class Turn:
    """One message of a logged conversation and what is known about when and who made it."""

    role: str
    content: str
    timestamp: datetime | None = None
    hashed_ip: str | None = None
    policy_version: str | None = None
    turn_identifier: int | None = None
    redacted: bool = False


@dataclass
class Snapshot:
    """A conversation as of its latest turn."""

    conversation_id: str
    user: str | None
    model: str
    turns: list[Turn]
    redacted: bool = False
    """True once `turns` hold redacted text (the row read back from a part)."""


def snapshot_of(turn: ChatTurn) -> Snapshot:
    """The conversation a turn shows: the history as sent, the user turn and the answer."""
    history = [m for m in turn.messages if m["role"] != "system"]
    turns = [Turn(m["role"], m["content"], hashed_ip=turn.user if m["role"] == "user" else None)
             for m in history[:-1]]
    turns.append(Turn("user", history[-1]["content"], turn.requested_at, turn.user))
    turns.append(Turn("assistant", turn.reply, turn.answered_at, policy_version=turn.policy_version))
    return Snapshot(turn.conversation_id, turn.user, turn.model, turns)


def carry_over(new: list[Turn], old: list[Turn]) -> list[Turn]:
    """`new` with the metadata of the turns it shares with `old`: the common prefix of equal
    role and text (a client that edits or regenerates a turn starts a new branch there)."""
    out = list(new)
    for i, (n, o) in enumerate(zip(new, old)):
        if (n.role, n.content) != (o.role, o.content):
            break
        out[i] = replace(o, hashed_ip=o.hashed_ip or n.hashed_ip)
    return out


def redact_snapshot(snapshot: Snapshot, redactor: Redacts) -> Snapshot:
    redacted = redactor.redact_many([t.content for t in snapshot.turns])
    turns = [replace(t, content=text, redacted=bool(found)) for t, (text, found) in zip(snapshot.turns, redacted)]
    return replace(snapshot, turns=turns, redacted=True)


def wildchat_row(snapshot: Snapshot, language: str) -> dict[str, Any]:
    """A redacted snapshot with turn ids as one row of WildChat's Hub schema."""
    turns = [{"content": t.content, "country": None, "hashed_ip": t.hashed_ip,
              "header": ({"accept-language": None, "user-agent": t.policy_version}
                         if t.role == "assistant" and t.policy_version else None),
              "language": language, "redacted": t.redacted, "role": t.role, "state": None,
              "timestamp": t.timestamp, "toxic": None, "turn_identifier": t.turn_identifier}
             for t in snapshot.turns]
    stamps = [t.timestamp for t in snapshot.turns if t.timestamp is not None]
    return {"conversation_hash": snapshot.conversation_id, "model": snapshot.model,
            "timestamp": max(stamps), "conversation": turns,
            "turn": sum(t.role == "user" for t in snapshot.turns), "language": language,
            "openai_moderation": None, "detoxify_moderation": None, "toxic": None,
            "redacted": any(t.redacted for t in snapshot.turns), "state": None, "country": None,
            "hashed_ip": snapshot.user, "header": None}


def snapshot_from_row(row: dict[str, Any]) -> Snapshot:
    """A row read back from a part (its text already redacted)."""
    turns = [Turn(t["role"], t["content"], t["timestamp"], t["hashed_ip"],
                  (t["header"] or {}).get("user-agent") if t["role"] == "assistant" else None,
                  t["turn_identifier"], bool(t["redacted"]))
             for t in row["conversation"]]
    return Snapshot(row["conversation_hash"], row["hashed_ip"], row["model"], turns, redacted=True)
