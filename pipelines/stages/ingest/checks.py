"""Per-row rules of ingest: structure, filters, user key, redaction.

Plain functions over plain records (see pipelines/stages/ingest/sources.py), so they are tested without
Ray and shared by the Ray Data stage and the single-process baseline of bench/ingest.py.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from pipelines.config import Filters, IngestConfig
from pipelines.schema import CONVERSATIONS, REJECTS, conversation_id, pseudonym


def structure_error(record: dict[str, Any]) -> tuple[str, str] | None:
    """The first structure rule a record breaks, as (reason, detail), or None.

    A failure rejects the whole conversation: nothing is repaired or truncated.
    """
    if record.get("error"):
        return record["error"]
    turns = record["turns"]
    if turns is None:
        return "missing_conversation", "the conversation field is missing or null"
    if not turns:
        return "empty_conversation", "the conversation has no turns"
    if record["source_format"] == "wildchat" and not (record["language"] or "").strip():
        return "unknown_language", "the language field is null or empty"
    if record["source_format"] == "jsonl" and not (isinstance(record["user_id"], str) and record["user_id"].strip()):
        return "missing_user", "user_id is missing, blank or not a string"
    if record["source_format"] == "wildchat" and not record["user_parts"][0]:
        return "missing_user", "hashed_ip is null"
    if record["timestamp"] is None:
        return "bad_timestamp", f"timestamp {record.get('raw_timestamp')!r} is missing or unreadable"
    for field in ("model", "language"):
        if record[field] is not None and not isinstance(record[field], str):
            return "non_string_field", f"{field} is {type(record[field]).__name__}, not a string"
    if record["system"] is not None and not isinstance(record["system"], str):
        return "non_string_content", "the system message's content is not a string"
    for name, text in (("user_id", record["user_id"]), ("model", record["model"]),
                       ("language", record["language"]), ("the system message", record["system"])):
        if isinstance(text, str) and (bad := _unencodable(text)):
            return "invalid_text", f"{name}: {bad}"
    for index, turn in enumerate(turns):
        if turn is None or turn["content"] is None:
            return "null_content", f"turn {index}: content is null"
        if not isinstance(turn["content"], str):
            return "non_string_content", f"turn {index}: content is {type(turn['content']).__name__}, not a string"
        if bad := _unencodable(turn["content"]):
            return "invalid_text", f"turn {index}: {bad}"
        if not turn["content"].strip():
            return "blank_content", f"turn {index}: content has no non-whitespace text"
        if turn["role"] not in ("user", "assistant"):
            return "bad_role", f"turn {index}: role {turn['role']!r} is not 'user' or 'assistant'"
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return "role_order", f"turn {index}: role {turn['role']!r} where {expected!r} was expected " \
                                 "(turns must alternate, starting with the user)"
    return None


def _unencodable(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate: an emoji cut in half by an
    export), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"character {exc.start} is a lone surrogate ({text[exc.start]!r}), which UTF-8 cannot hold; "
                "re-export the file with whole characters")
    return None


def filter_reason(record: dict[str, Any], filters: Filters) -> tuple[str, str] | None:
    """The first configured filter a well-formed record fails, as (reason, detail), or None."""
    if filters.languages != "all" and record["language"] not in filters.languages:
        return "language", f"language {record['language']!r} is not in {filters.languages}"
    if filters.drop_toxic and record["toxic"]:
        return "toxic", "flagged toxic or by OpenAI moderation"
    if filters.drop_redacted and record["wildchat_redacted"]:
        return "wildchat_redacted", "WildChat marked the conversation redacted"
    user_turns = sum(1 for turn in record["turns"] if turn["role"] == "user")
    if user_turns < filters.min_user_turns:
        return "min_user_turns", f"{user_turns} user turns < {filters.min_user_turns}"
    chars = sum(len(turn["content"]) for turn in record["turns"])
    if chars > filters.max_chars:
        return "too_long", f"{chars} characters > {filters.max_chars}"
    return None


def user_id(record: dict[str, Any], user_key: str) -> str | None:
    """The user a record belongs to. `hashed_ip` alone is used as it is when it is a hash
    (so WildChat's own id still finds the user), any other key hashed (`pseudonym`);
    combined keys are hashed together."""
    if record["source_format"] == "jsonl":
        return pseudonym(record["user_id"])
    hashed_ip, agent, language = record["user_parts"]
    if not hashed_ip:
        return None
    if user_key == "hashed_ip":
        return pseudonym(hashed_ip)
    parts = [hashed_ip, agent or ""] + ([language or ""] if user_key.endswith("accept_language") else [])
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


def conversation_row(record: dict[str, Any], uid: str, cid: str, redactions: int) -> dict[str, Any]:
    turns = record["turns"]
    return {
        "conversation_id": cid, "user_id": uid, "conversation_hash": record["conversation_hash"],
        "timestamp": record["timestamp"], "model": record["model"], "language": record["language"],
        "system": record["system"], "turns": turns,
        "n_user_turns": sum(1 for t in turns if t["role"] == "user"),
        "n_chars": sum(len(t["content"]) for t in turns), "toxic": record["toxic"],
        "wildchat_redacted": record["wildchat_redacted"], "redactions": redactions,
        "country": record["country"], "state": record["state"],
        "hashed_ip": record["hashed_ip"] and pseudonym(record["hashed_ip"]),
        "source_format": record["source_format"], "source_file": record["source_file"],
        "source_index": record["source_index"],
    }


def reject_row(record: dict[str, Any], status: str, reason: str, detail: str,
                uid: str | None = None, cid: str | None = None) -> dict[str, Any]:
    return {"source_file": record["source_file"], "source_index": record["source_index"],
            "conversation_hash": record.get("conversation_hash"), "conversation_id": cid,
            "user_id": uid, "status": status, "reason": reason, "detail": detail}


@dataclass
class CheckResult:
    """What one batch of records became."""

    conversations: pa.Table
    rejects: pa.Table
    rows_in: int
    redacted: Counter = field(default_factory=Counter)


def check_records(records: Iterable[dict[str, Any]], settings: IngestConfig, redactor) -> CheckResult:
    """Structure, filters and redaction over records; every record is kept or rejected."""
    kept, rejects, redacted, rows_in = [], [], Counter(), 0
    for record in records:
        rows_in += 1
        problem = structure_error(record)
        if problem:
            rejects.append(reject_row(record, "rejected", *problem))
            continue
        uid = user_id(record, settings.user_key)
        first = record["turns"][0]
        first_key = str(first["turn_identifier"] or first["timestamp"] or record["timestamp"].isoformat())
        cid = conversation_id(uid, record["conversation_hash"] or "", first_key)
        reason = filter_reason(record, settings.filters)
        if reason:
            rejects.append(reject_row(record, "filtered", *reason, uid=uid, cid=cid))
            continue
        kept.append((record, uid, cid))
    # Redaction over the batch's texts at once (its prefilters are vectorised): every turn,
    # and the system prompt where there is one.
    texts = [text for record, _, _ in kept for text in _texts(record)]
    results = iter(redactor.redact_many(texts))
    rows = []
    for record, uid, cid in kept:
        count = 0
        for turn in record["turns"]:
            turn["content"], found = next(results)
            redacted.update(found)
            count += sum(found.values())
        if record["system"]:
            record["system"], found = next(results)
            redacted.update(found)
            count += sum(found.values())
        rows.append(conversation_row(record, uid, cid, count))
    return CheckResult(pa.Table.from_pylist(rows, schema=CONVERSATIONS),
                       pa.Table.from_pylist(rejects, schema=REJECTS), rows_in, redacted)


def _texts(record: dict[str, Any]) -> list[str]:
    """The texts of a record that redaction reads, in the order check_records puts them back."""
    return [turn["content"] for turn in record["turns"]] + ([record["system"]] if record["system"] else [])
