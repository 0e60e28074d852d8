"""Tools for labelling the follow-ups of `train-00000-of-00001.parquet` (see SOURCE.md).

    python data/wildchat-more/label_kit.py split                 # writes split.jsonl (once)
    python data/wildchat-more/label_kit.py chunks                # lists the chunks and their sizes
    python data/wildchat-more/label_kit.py render CHUNK          # every conversation of a chunk, in full context
    python data/wildchat-more/label_kit.py render-bundled        # the bundled sample with its gold labels (calibration)
    python data/wildchat-more/label_kit.py check PASS CHUNK      # a pass's label file for a chunk is complete and valid
    python data/wildchat-more/label_kit.py disagreements CHUNK   # the turns where passes a and b differ, in context
    python data/wildchat-more/label_kit.py merge                 # followup_labels.jsonl + agreement.json (needs scikit-learn)

A follow-up is a user turn right after an assistant turn; its key is the conversation's
`conversation_hash` and the turn's `message_index` in `conversation`. Label files are JSONL,
one line per follow-up: labels/pass-<a|b>/<chunk>.jsonl, labels/adjudicated/<chunk>.jsonl.
`merge` writes `followup_labels.jsonl` (every follow-up: the adjudicated label where the
passes disagreed, else theirs; both passes' labels and preferences; the split) and
`agreement.json` (Cohen's kappa of the two passes per label, one against the rest, for
"carries feedback", and over all labels). Only pyarrow is needed, and scikit-learn for merge.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DATA = HERE / "train-00000-of-00001.parquet"
SPLIT = HERE / "split.jsonl"
LABELS = HERE / "labels"
BUNDLED = HERE.parent / "wildchat"
SEED = 20261202
DEV_FRACTION = 0.7
CHUNKS = {"dev": 6, "test": 3}
FOLLOWUP_LABELS = ("reattempt_feedback", "correction", "complaint", "clarification", "positive", "new_request")
FEEDBACK_LABELS = FOLLOWUP_LABELS[:3]
PREFERENCES = {"length": ("short", "medium", "long"), "format": ("structured", "prose"),
               "register": ("formal", "casual"), "examples": ("yes", "no"),
               "ending": ("question", "statement")}
USER_CHARS, ANSWER_HEAD, ANSWER_TAIL = 4000, 1500, 500


def conversations(path: Path = DATA) -> list[dict]:
    return pq.read_table(path, columns=["conversation_hash", "conversation"]).to_pylist()


def followup_indices(turns: list[dict]) -> list[int]:
    return [i for i in range(1, len(turns))
            if turns[i]["role"] == "user" and turns[i - 1]["role"] == "assistant"]


def make_split() -> None:
    """Seeded shuffle of the sorted hashes: the first 70% are dev, split into chunks in order."""
    if SPLIT.exists():
        raise SystemExit(f"{SPLIT} exists: the split is made once")
    hashes = sorted(row["conversation_hash"] for row in conversations())
    random.Random(SEED).shuffle(hashes)
    n_dev = round(DEV_FRACTION * len(hashes))
    lines = []
    for split, part in (("dev", hashes[:n_dev]), ("test", hashes[n_dev:])):
        size = -(-len(part) // CHUNKS[split])
        for i, h in enumerate(part):
            lines.append({"conversation_hash": h, "split": split, "chunk": f"{split}-{i // size:02d}"})
    SPLIT.write_text("".join(json.dumps(line) + "\n" for line in lines))


def split_rows() -> list[dict]:
    return [json.loads(line) for line in SPLIT.read_text().splitlines()]


def chunk_conversations(chunk: str) -> list[dict]:
    wanted = [r["conversation_hash"] for r in split_rows() if r["chunk"] == chunk]
    if not wanted:
        raise SystemExit(f"no chunk {chunk!r}; chunks: {sorted({r['chunk'] for r in split_rows()})}")
    by_hash = {row["conversation_hash"]: row for row in conversations()}
    return [by_hash[h] for h in wanted]


def _shown(text: str | None, role: str) -> str:
    text = text or ""
    if role == "user" and len(text) > USER_CHARS:
        return text[:USER_CHARS - 1000] + f"\n[... {len(text) - USER_CHARS} characters left out ...]\n" + text[-1000:]
    if role != "user" and len(text) > ANSWER_HEAD + ANSWER_TAIL:
        cut = len(text) - ANSWER_HEAD - ANSWER_TAIL
        return text[:ANSWER_HEAD] + f"\n[... {cut} characters left out ...]\n" + text[-ANSWER_TAIL:]
    return text


def render(rows: list[dict], gold: dict | None = None) -> str:
    out = []
    for n, row in enumerate(rows, 1):
        turns = row["conversation"]
        marks = set(followup_indices(turns))
        out.append(f"\n{'=' * 30} conversation {n}/{len(rows)}  conversation_hash={row['conversation_hash']}"
                   f"  ({len(turns)} turns, {len(marks)} follow-ups) {'=' * 30}")
        for i, turn in enumerate(turns):
            head = f"--- [{i}] {turn['role'].upper()}"
            if i in marks:
                head += f"   >>> FOLLOW-UP TO LABEL: message_index={i} <<<"
                if gold is not None:
                    g = gold.get((row["conversation_hash"], i))
                    head += f"   GOLD: {g['label']} ({g['rationale']})" if g else "   GOLD: (none)"
            out.append(head)
            out.append(_shown(turn["content"], turn["role"]))
    return "\n".join(out)


def read_labels(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(pass_name: str, chunk: str) -> list[str]:
    """Problems with labels/pass-<pass>/<chunk>.jsonl; [] when it is complete and valid."""
    path = LABELS / f"pass-{pass_name}" / f"{chunk}.jsonl" if pass_name in "ab" else LABELS / pass_name / f"{chunk}.jsonl"
    if not path.is_file():
        return [f"{path}: missing"]
    expected = {(row["conversation_hash"], i) for row in chunk_conversations(chunk)
                for i in followup_indices(row["conversation"])}
    problems, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {n}: not JSON ({exc})")
            continue
        key = (item.get("conversation_hash"), item.get("message_index"))
        if key not in expected:
            problems.append(f"line {n}: {key} is not a follow-up of chunk {chunk}")
        if key in seen:
            problems.append(f"line {n}: {key} labelled twice")
        seen.add(key)
        if item.get("label") not in FOLLOWUP_LABELS:
            problems.append(f"line {n}: label {item.get('label')!r} not in {FOLLOWUP_LABELS}")
        if item.get("feedback") is not (item.get("label") in FEEDBACK_LABELS):
            problems.append(f"line {n}: feedback must be {item.get('label') in FEEDBACK_LABELS} for {item.get('label')}")
        if not isinstance(item.get("rationale"), str) or not item["rationale"].strip():
            problems.append(f"line {n}: rationale missing")
        prefs = item.get("preferences", [])
        if not isinstance(prefs, list):
            problems.append(f"line {n}: preferences must be a list")
            continue
        if prefs and item.get("label") not in FEEDBACK_LABELS:
            problems.append(f"line {n}: preferences are recorded for feedback turns only")
        for pref in prefs:
            dim, value = (pref or {}).get("dimension"), (pref or {}).get("value")
            if dim == "language":
                if not isinstance(value, str) or not value[:1].isupper():
                    problems.append(f"line {n}: language value must be a capitalised language name, got {value!r}")
            elif value not in PREFERENCES.get(dim, ()):
                problems.append(f"line {n}: preference {pref!r} not in the vocabulary {PREFERENCES} (or language)")
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"{len(missing)} follow-ups not labelled, e.g. {missing[:3]}")
    return problems


def disagreements(chunk: str) -> str:
    a = {(x["conversation_hash"], x["message_index"]): x for x in read_labels(LABELS / "pass-a" / f"{chunk}.jsonl")}
    b = {(x["conversation_hash"], x["message_index"]): x for x in read_labels(LABELS / "pass-b" / f"{chunk}.jsonl")}

    def prefs(x: dict) -> list:
        return sorted((p["dimension"], p["value"]) for p in x.get("preferences", []))

    out = []
    for row in chunk_conversations(chunk):
        turns = row["conversation"]
        for i in followup_indices(turns):
            key = (row["conversation_hash"], i)
            la, lb = a[key], b[key]
            if la["label"] == lb["label"] and prefs(la) == prefs(lb):
                continue
            out.append(f"\n{'=' * 20} conversation_hash={key[0]} message_index={i} {'=' * 20}")
            for j in range(max(0, i - 3), i + 1):
                out.append(f"--- [{j}] {turns[j]['role'].upper()}")
                out.append(_shown(turns[j]["content"], turns[j]["role"]))
            out.append(f"PASS A: {la['label']} prefs={prefs(la)} | {la['rationale']}")
            out.append(f"PASS B: {lb['label']} prefs={prefs(lb)} | {lb['rationale']}")
    return "\n".join(out) or "(no disagreements)"


def _prefs(item: dict) -> list[dict]:
    return sorted(item.get("preferences", []), key=lambda p: (p["dimension"], str(p["value"])))


def merge() -> dict:
    """Write followup_labels.jsonl and agreement.json from the passes and the adjudication."""
    from sklearn.metrics import cohen_kappa_score

    rows, a_labels, b_labels = [], [], []
    for chunk in sorted({r["chunk"] for r in split_rows()}):
        a = {(x["conversation_hash"], x["message_index"]): x for x in read_labels(LABELS / "pass-a" / f"{chunk}.jsonl")}
        b = {(x["conversation_hash"], x["message_index"]): x for x in read_labels(LABELS / "pass-b" / f"{chunk}.jsonl")}
        settled = {(x["conversation_hash"], x["message_index"]): x
                   for x in read_labels(LABELS / "adjudicated" / f"{chunk}.jsonl")}
        for row in chunk_conversations(chunk):
            for i in followup_indices(row["conversation"]):
                key = (row["conversation_hash"], i)
                la, lb = a[key], b[key]
                agreed = la["label"] == lb["label"] and _prefs(la) == _prefs(lb)
                if not agreed and key not in settled:
                    raise SystemExit(f"{chunk}: {key} has no adjudicated label")
                final = la if agreed else settled[key]
                rows.append({"conversation_hash": key[0], "message_index": i, "label": final["label"],
                             "feedback": final["label"] in FEEDBACK_LABELS, "preferences": _prefs(final),
                             "rationale": final["rationale"], "split": chunk.split("-")[0], "chunk": chunk,
                             "label_a": la["label"], "label_b": lb["label"], "preferences_a": _prefs(la),
                             "preferences_b": _prefs(lb), "adjudicated": not agreed})
                a_labels.append(la["label"])
                b_labels.append(lb["label"])

    def kappa(x: list, y: list) -> float | None:
        return None if len(set(x) | set(y)) < 2 else round(float(cohen_kappa_score(x, y)), 3)

    agreement = {"followups": len(rows), "raw_agreement": round(sum(x == y for x, y in zip(a_labels, b_labels)) / len(rows), 3),
                 "kappa_all_labels": kappa(a_labels, b_labels),
                 "kappa_carries_feedback": kappa([x in FEEDBACK_LABELS for x in a_labels],
                                                 [y in FEEDBACK_LABELS for y in b_labels]),
                 "kappa_per_label": {lab: kappa([x == lab for x in a_labels], [y == lab for y in b_labels])
                                     for lab in FOLLOWUP_LABELS},
                 "adjudicated": sum(r["adjudicated"] for r in rows),
                 "per_split": {split: sum(r["split"] == split for r in rows) for split in ("dev", "test")}}
    (HERE / "followup_labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
    return agreement


def main(argv: list[str]) -> int:
    command, *rest = argv or ["help"]
    if command == "split":
        make_split()
    elif command == "chunks":
        rows = split_rows()
        by_hash = {row["conversation_hash"]: row for row in conversations()}
        for chunk in sorted({r["chunk"] for r in rows}):
            hs = [r["conversation_hash"] for r in rows if r["chunk"] == chunk]
            n = sum(len(followup_indices(by_hash[h]["conversation"])) for h in hs)
            print(f"{chunk}: {len(hs)} conversations, {n} follow-ups")
    elif command == "render":
        print(render(chunk_conversations(rest[0])))
    elif command == "render-bundled":
        gold = {(g["conversation_hash"], g["message_index"]): g
                for g in read_labels(BUNDLED / "followup_labels.jsonl")}
        print(render(conversations(BUNDLED / "train-00000-of-00001.parquet"), gold))
    elif command == "check":
        problems = check(rest[0], rest[1])
        print("\n".join(problems) or "ok")
        return 1 if problems else 0
    elif command == "disagreements":
        print(disagreements(rest[0]))
    elif command == "merge":
        print(json.dumps(merge(), indent=2))
    else:
        print(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
