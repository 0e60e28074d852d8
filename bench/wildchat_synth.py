"""A large, realistic WildChat-1M-shaped Parquet input, grown from the 50 bundled rows.

Each generated conversation copies a sample row (so the 3 role-order-broken rows stay in
proportion, and so do the rare rows that make redaction expensive) and then changes what a
benchmark must not be able to take for granted:

- **text**: a share of the words in every turn is replaced by words drawn from the sample's
  own word stream (so frequent words stay frequent), every number gets fresh random digits
  (same length and separators, so phone-like runs stay phone-like), and a few words become
  identifiers or secrets (e-mails, phone numbers, public IPs, card numbers, API keys) for
  redaction to find. Copies of one sample row therefore share only short runs, and the
  files compress like real chat text instead of like 4,000 copies of one conversation;
- **users**: `hashed_ip` (with the user's `header`, country and state) drawn from a Zipf law
  over ranks, so a few users own thousands of conversations (the top one passes the
  default per-user cap at 200k rows) and most own one;
- **identity**: a fresh `conversation_hash`, timestamps spread over a year (turn times
  shifted with them), `turn_identifier`s unique over the whole dataset;
- **work for the filters**: a small share of exact duplicates (same user, hash and first
  turn), of hash collisions between different users (not duplicates), and of rows flagged
  toxic at the top level, on a turn, or by OpenAI moderation.

The schema is the Hub's, copied from the bundled file. Everything is vectorised with numpy
and pyarrow (about 1.5 s per 10,000 rows on one core) and seeded, so a seed and a size
always give the same bytes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "wildchat" / "train-00000-of-00001.parquet"
YEAR_START_US = 1_680_998_400_000_000  # 2023-04-09, when WildChat-1M starts
YEAR_US = 365 * 24 * 3600 * 1_000_000
FIRST_TURN_ID = 10_000_000  # above every identifier in the sample
UTC_US = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Rates:
    """How much of each kind of work the generated data holds."""

    replace_word: float = 0.30      # share of words replaced by a random sample word
    identifier: float = 5e-5        # share of words replaced by an e-mail, phone, IP, card or key
    duplicate: float = 0.01         # rows that repeat an earlier row exactly
    hash_collision: float = 0.005   # rows that reuse another row's conversation_hash
    toxic: float = 0.02             # top-level `toxic`
    turn_toxic: float = 0.01        # first turn's `toxic`
    flagged: float = 0.015          # first `openai_moderation` entry flagged
    zipf_exponent: float = 1.0      # users: share of rank k proportional to k**-exponent
    users_per_row: float = 0.5      # user ranks drawn from, per generated row


# --- the sample, split into words once ---------------------------------------------------

@dataclass
class Vocabulary:
    """Every turn of the sample as (word, whitespace) pairs, plus the strings they index."""

    pieces: pa.StringArray    # words, then digit variants, identifiers, whitespace runs
    pair_word: np.ndarray     # per pair: index into pieces of its word
    pair_space: np.ndarray    # per pair: index into pieces of its trailing whitespace
    turn_pairs: np.ndarray    # per sample turn: offsets into the pair arrays
    word_stream: np.ndarray   # every non-empty word occurrence, the pool replacements come from
    digit_slot: np.ndarray    # per word: its column among the digit words, or -1
    variant_base: int         # pieces[variant_base + v * n_digit + slot]: variant v of a digit word
    n_digit: int
    n_variants: int
    identifier_base: int
    n_identifiers: int


def _split_words(text: str) -> list[tuple[str, str]]:
    lead = re.match(r"\s*", text).group()
    return [("", lead)] + re.findall(r"(\S+)(\s*)", text[len(lead):])


def _identifiers(rng: np.random.Generator, n: int) -> list[str]:
    """Strings redaction must find: e-mails, phones, public IPs, Luhn-valid cards, keys."""
    def luhn_card() -> str:  # a Visa-like 16-digit number with a valid Luhn check digit
        body = [4] + [int(d) for d in rng.integers(0, 10, 14)]
        total = sum(2 * d - 9 * (d > 4) if i % 2 == 0 else d for i, d in enumerate(reversed(body)))
        return " ".join("".join(map(str, body + [-total % 10]))[i:i + 4] for i in range(0, 16, 4))

    alnum = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    upper = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"))
    makers = [
        lambda: f"{''.join(rng.choice(alnum[:26], 7))}.{rng.integers(10, 99)}@{rng.choice(['gmail.com', 'yahoo.co.uk', 'mail.ru', 'qq.com'])}",
        lambda: f"+1 ({rng.integers(201, 989)}) {rng.integers(200, 999)}-{rng.integers(1000, 9999)}",
        lambda: f"+44 20 {rng.integers(7000, 8999)} {rng.integers(1000, 9999)}",
        lambda: ".".join(str(x) for x in [rng.integers(11, 99), *rng.integers(1, 254, 3)]),
        luhn_card,
        lambda: "ghp_" + "".join(rng.choice(alnum, 36)),
        lambda: "AKIA" + "".join(rng.choice(upper, 16)),
        lambda: "sk-" + "".join(rng.choice(alnum, 20)) + "T3BlbkFJ" + "".join(rng.choice(alnum, 20)),
    ]
    return [makers[i % len(makers)]() for i in range(n)]


def _digit_variants(words: list[str], rng: np.random.Generator, n_variants: int) -> pa.Array:
    """`n_variants` copies of every word, each with its ASCII digits drawn afresh."""
    data = np.frombuffer("".join(words).encode(), dtype=np.uint8)
    lengths = np.array([len(w.encode()) for w in words], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    is_digit = (data >= 48) & (data <= 57)
    copies = np.tile(data, n_variants)
    mask = np.tile(is_digit, n_variants)
    copies[mask] = rng.integers(48, 58, int(mask.sum()), dtype=np.uint8)
    all_offsets = (offsets[None, :-1] + len(data) * np.arange(n_variants)[:, None]).ravel()
    all_offsets = np.concatenate([all_offsets, [len(data) * n_variants]]).astype(np.int64)
    return pa.LargeStringArray.from_buffers(len(words) * n_variants, pa.py_buffer(all_offsets),
                                            pa.py_buffer(copies.tobytes())).cast(pa.string())


def build_vocabulary(turn_texts: list[str], rng: np.random.Generator, n_variants: int = 32,
                     n_identifiers: int = 256) -> Vocabulary:
    words: dict[str, int] = {"": 0}
    spaces: dict[str, int] = {}
    pair_word, pair_space, turn_pairs = [], [], [0]
    for text in turn_texts:
        for word, space in _split_words(text):
            pair_word.append(words.setdefault(word, len(words)))
            pair_space.append(spaces.setdefault(space, len(spaces)))
        turn_pairs.append(len(pair_word))
    word_list = list(words)
    digit_words = [w for w in word_list if any(c.isdigit() and c.isascii() for c in w)]
    digit_slot = np.full(len(word_list), -1, dtype=np.int64)
    digit_slot[[words[w] for w in digit_words]] = np.arange(len(digit_words))
    variant_base = len(word_list)
    identifier_base = variant_base + len(digit_words) * n_variants
    space_base = identifier_base + n_identifiers
    pieces = pa.concat_arrays([pa.array(word_list, pa.string()),
                               _digit_variants(digit_words, rng, n_variants),
                               pa.array(_identifiers(rng, n_identifiers), pa.string()),
                               pa.array(list(spaces), pa.string())])
    pair_word = np.array(pair_word, dtype=np.int64)
    return Vocabulary(pieces, pair_word, np.array(pair_space, dtype=np.int64) + space_base,
                      np.array(turn_pairs, dtype=np.int64), pair_word[pair_word != 0], digit_slot,
                      variant_base, len(digit_words), n_variants, identifier_base, n_identifiers)


# --- vectorised helpers ------------------------------------------------------------------

def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated arange(start, start + count) for each pair, without a Python loop."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])


def _hex_strings(rng: np.random.Generator, n: int, n_bytes: int) -> pa.Array:
    data = rng.bytes(n * n_bytes).hex().encode()
    offsets = np.arange(0, n * 2 * n_bytes + 1, 2 * n_bytes, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _with_fields(array: pa.StructArray, **replace: pa.Array) -> pa.StructArray:
    fields = list(array.type)
    children = [replace.get(f.name, array.field(i)) for i, f in enumerate(fields)]
    return pa.StructArray.from_arrays(children, fields=fields)


def _list_of(offsets: np.ndarray, values: pa.Array, list_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, type=list_type)


# --- the generator ------------------------------------------------------------------------

class WildChatSynth:
    """Generates the rows of one dataset in chunks, each a pure function of (seed, position)."""

    def __init__(self, n_rows: int, seed: int = 0, rates: Rates = Rates()) -> None:
        self.sample = pq.read_table(SAMPLE)
        self.schema = pq.read_schema(SAMPLE)
        self.n_rows, self.seed, self.rates = n_rows, seed, rates
        rng = np.random.default_rng([seed, 0])
        conversation = self.sample.column("conversation").combine_chunks()
        self.turns = conversation.flatten()
        self.row_turns = np.diff(conversation.offsets.to_numpy()).astype(np.int64)
        self.row_first_turn = conversation.offsets.to_numpy()[:-1].astype(np.int64)
        self.vocab = build_vocabulary(self.turns.field("content").to_pylist(), rng)
        self.sample_ts = self.sample.column("timestamp").cast(pa.int64()).to_numpy()
        self.turn_is_user = self.turns.field("hashed_ip").is_valid().to_numpy(zero_copy_only=False)

        # Whole-dataset draws: which sample row, which user, when.
        self.src = rng.integers(0, self.sample.num_rows, n_rows)
        n_users = max(1, int(n_rows * rates.users_per_row))
        weights = 1.0 / np.arange(1, n_users + 1) ** rates.zipf_exponent
        self.user = rng.choice(n_users, n_rows, p=weights / weights.sum())
        home = rng.integers(0, self.sample.num_rows, n_users)  # headers, country, state
        self.users = pa.table({"hashed_ip": _hex_strings(rng, n_users, 32),
                               "header": self.sample.column("header").combine_chunks().take(home),
                               "country": self.sample.column("country").combine_chunks().take(home),
                               "state": self.sample.column("state").combine_chunks().take(home)})
        self.ts = YEAR_START_US + 1_000_000 * rng.integers(0, YEAR_US // 1_000_000, n_rows)
        self.turn_id_start = FIRST_TURN_ID + np.concatenate([[0], np.cumsum(self.row_turns[self.src])])

    def chunk(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of the dataset (exact schema, deterministic)."""
        rng = np.random.default_rng([self.seed, 1, start])
        r, vocab = self.rates, self.vocab
        src, user, m = self.src[start:stop], self.user[start:stop], stop - start

        # Turns: which sample turn each output turn copies, and which output row owns it.
        counts = self.row_turns[src]
        turn_offsets = np.concatenate([[0], np.cumsum(counts)])
        sample_turn = _ranges(self.row_first_turn[src], counts)
        owner = np.repeat(np.arange(m), counts)

        # Text: (word, space) pairs of the copied turns, words replaced, digits redrawn.
        pair_counts = np.diff(vocab.turn_pairs)[sample_turn]
        pairs = _ranges(vocab.turn_pairs[sample_turn], pair_counts)
        words = vocab.pair_word[pairs]
        real = words != 0
        draw = rng.random(len(words))
        swap = real & (draw < r.replace_word)
        words[swap] = vocab.word_stream[rng.integers(0, len(vocab.word_stream), int(swap.sum()))]
        slot = vocab.digit_slot[words]
        has_digit = slot >= 0
        variant = rng.integers(0, vocab.n_variants, int(has_digit.sum()))
        words[has_digit] = vocab.variant_base + variant * vocab.n_digit + slot[has_digit]
        secret = real & (draw > 1 - r.identifier)
        words[secret] = vocab.identifier_base + rng.integers(0, vocab.n_identifiers, int(secret.sum()))
        order = np.empty(2 * len(words), dtype=np.int64)
        order[0::2], order[1::2] = words, vocab.pair_space[pairs]
        pair_offsets = np.concatenate([[0], np.cumsum(pair_counts)])
        content = pc.binary_join(pa.ListArray.from_arrays(pa.array(2 * pair_offsets, pa.int32()),
                                                          vocab.pieces.take(pa.array(order))), "")

        # The turns' other fields: the user's identity on user turns, shifted times, new ids.
        turns = self.turns.take(pa.array(sample_turn))
        user_turn = self.turn_is_user[sample_turn]
        per_turn_user = pa.array(user[owner], mask=~user_turn)
        delta = self.ts[start:stop] - self.sample_ts[src]
        toxic_turn = np.zeros(len(sample_turn), bool)
        toxic_turn[turn_offsets[:-1][(rng.random(m) < r.turn_toxic) & (counts > 0)]] = True
        turns = _with_fields(
            turns, content=content,
            hashed_ip=self.users.column("hashed_ip").take(per_turn_user).combine_chunks(),
            header=self.users.column("header").take(per_turn_user).combine_chunks(),
            country=self.users.column("country").take(per_turn_user).combine_chunks(),
            state=self.users.column("state").take(per_turn_user).combine_chunks(),
            timestamp=pc.add(turns.field("timestamp"), pa.array(delta[owner], pa.duration("us"))),
            toxic=pc.or_(turns.field("toxic"), pa.array(toxic_turn)),
            turn_identifier=pa.array(self.turn_id_start[start] + np.arange(len(sample_turn))))
        conversation = _list_of(turn_offsets, turns, self.schema.field("conversation").type)

        table = self.sample.take(pa.array(src))
        hashes = _hex_strings(rng, m, 16)
        collide = np.flatnonzero(rng.random(m) < r.hash_collision)
        if len(collide):
            hashes = pc.replace_with_mask(hashes, pa.array(np.isin(np.arange(m), collide)),
                                          hashes.take(pa.array(rng.integers(0, m, len(collide)))))
        columns = {
            "conversation_hash": hashes, "conversation": conversation,
            "timestamp": pa.array(self.ts[start:stop], UTC_US),
            "toxic": pc.or_(table.column("toxic").combine_chunks(), pa.array(rng.random(m) < r.toxic)),
            "openai_moderation": self._flag_moderation(table.column("openai_moderation").combine_chunks(),
                                                       rng.random(m) < r.flagged),
            **{name: self.users.column(name).take(pa.array(user)).combine_chunks()
               for name in ("hashed_ip", "header", "country", "state")},
        }
        for name, column in columns.items():
            table = table.set_column(self.schema.get_field_index(name), self.schema.field(name), column)
        return table.take(pa.array(self._duplicate_order(rng, m)))

    def _flag_moderation(self, moderation: pa.ListArray, flag_row: np.ndarray) -> pa.ListArray:
        offsets = (moderation.offsets.to_numpy() - moderation.offsets[0].as_py()).astype(np.int64)
        entries = moderation.flatten()
        first = np.zeros(len(entries), bool)
        first[offsets[:-1][flag_row & (np.diff(offsets) > 0)]] = True
        entries = _with_fields(entries, flagged=pc.or_(entries.field("flagged"), pa.array(first)))
        return _list_of(offsets, entries, moderation.type)

    def _duplicate_order(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """Row order with a share of rows replaced by exact copies of earlier rows."""
        order = np.arange(m)
        for position in np.flatnonzero(rng.random(m) < self.rates.duplicate):
            if position:
                order[position] = order[rng.integers(0, position)]
        return order

    def files(self, rows_per_file: int = 25_000) -> list[tuple[int, int]]:
        """Row ranges of the output files: at least two, at most `rows_per_file` rows each."""
        n_files = max(2, math.ceil(self.n_rows / rows_per_file))
        bounds = np.linspace(0, self.n_rows, n_files + 1).astype(int)
        return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))

    def write_file(self, path: Path, lo: int, hi: int, row_group_rows: int = 1_250,
                   chunk_rows: int = 5_000) -> Path:
        """Rows [lo, hi) as one Parquet file in the Hub's layout (zstd, like the sample)."""
        with pq.ParquetWriter(path, self.schema, compression="zstd") as writer:
            for start in range(lo, hi, chunk_rows):
                writer.write_table(self.chunk(start, min(hi, start + chunk_rows)), row_group_size=row_group_rows)
        return path


def _write_one(args: tuple[int, int, str, int, int]) -> str:
    n_rows, seed, path, lo, hi = args
    return str(WildChatSynth(n_rows, seed).write_file(Path(path), lo, hi))


def generate(folder: Path, n_rows: int, seed: int = 0, processes: int = 2) -> list[Path]:
    """Generate `n_rows` WildChat-schema conversations into `folder` as
    `train-XXXXX-of-YYYYY.parquet` files, like the Hub, one file per process at a time.
    Every file depends only on (n_rows, seed), so the bytes do not depend on `processes`."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    ranges = WildChatSynth(n_rows, seed).files()
    jobs = [(n_rows, seed, str(folder / f"train-{i:05d}-of-{len(ranges):05d}.parquet"), lo, hi)
            for i, (lo, hi) in enumerate(ranges)]
    if processes <= 1:
        return [Path(_write_one(job)) for job in jobs]
    with ProcessPoolExecutor(processes) as pool:
        return [Path(p) for p in pool.map(_write_one, jobs)]


def main(argv: list[str] | None = None) -> None:
    """Generate an input folder and report the generator's own speed.

        .venv/bin/python bench/wildchat_synth.py --rows 200000 --out /tmp/wildchat-200k
        .venv/bin/python bench/wildchat_synth.py --quick --json
    """
    import argparse
    import json
    import os
    import tempfile
    import time

    parser = argparse.ArgumentParser(description="Generate WildChat-schema Parquet from the bundled sample.")
    parser.add_argument("--rows", type=int, default=200_000, help="conversations to generate")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10,000 rows (overrides --rows)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    rows = 10_000 if args.quick else args.rows
    out = args.out or Path(tempfile.mkdtemp(prefix="wildchat-synth-"))
    start = time.perf_counter()
    files = generate(out, rows, args.seed)
    seconds = time.perf_counter() - start
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    load = round(os.getloadavg()[0], 2)
    print(f"{rows:,} conversations in {len(files)} files ({size_mb:.1f} MB) at {out} in {seconds:.1f} s "
          f"(load average {load}, 1 min)")
    if args.json:
        print(json.dumps({"rows": rows, "files": len(files), "mb": round(size_mb, 1),
                          "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds), "loadavg_1m": load}))


if __name__ == "__main__":
    main()
