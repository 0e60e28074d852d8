"""Benchmark: the follow-up backends, single process versus the Ray Data stage.

    .venv/bin/python bench/followups.py            # 200,000 generated conversations
    .venv/bin/python bench/followups.py --quick    # 20,000
    .venv/bin/python bench/followups.py --size 50000 --workdir /tmp/b --json

Top to bottom:
1. generate the WildChat-schema input of bench/ingest.py (bench/wildchat_synth.py) and
   ingest it once (reused from --workdir when present);
2. `single`: in this process, the stage's own work (`pipelines.stages.followups.label`: extract the
   follow-ups of each conversations part, label them with the rules backend) one part after
   another, each written as Parquet; the classifier's own speed per core is reported apart;
3. `ray`: the `followups` stage itself (pipelines/stages/followups.py: each part extracted and
   labelled in a Ray Data actor pool, Parquet written as results stream in);
4. check both give the same labels, print follow-ups per second and the ratio;
5. the model backends on one core (torch and BLAS held to one thread), on the first
   `--model-sample` follow-ups of the stage's output, against the rules classifier on the
   same follow-ups in the same run: `learned` (every follow-up through the encoder and
   the logistic regression) and `cascade` with the learned model (the rules first; only
   what they do not call a confident new request goes to the model).

`--json` prints one JSON object as the last line: `speedup_ratio` is single-process seconds
over Ray Data stage seconds; `learned_over_rules_ratio` and `cascade_over_rules_ratio` are
each backend's follow-ups per second over the rules classifier's on the same sample. The
machine's load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.wildchat_synth import generate  # noqa: E402
from pipelines.config import parse_config  # noqa: E402
from pipelines.schema import table_path  # noqa: E402


def prepare(workdir: Path, size: int) -> Path:
    """A run directory whose ingest stage is done on `size` generated conversations."""
    from pipelines.stages.ingest.stage import run_ingest
    from pipelines.contract import read_manifest

    data, run_dir = workdir / f"wildchat-{size}-seed0", workdir / f"followups-run-{size}"
    if not any(data.glob("*.parquet")):
        generate(data, size, seed=0)
    if read_manifest(run_dir, "ingest") is None:
        run_ingest(config(run_dir, data), use_ray=True)
    return run_dir


def config(run_dir: Path, data: Path | None = None):
    inputs = [str(data)] if data else []
    return parse_config({"run_dir": str(run_dir), "ingest": {"inputs": inputs},
                         "followups": {"backend": "rules", "batch_size": 512},
                         "resources": {"num_cpus": 2, "progress_bars": False}})


def single_process(run_dir: Path, batch_size: int) -> tuple[float, float, Counter]:
    """The stage's own work, part after part in this process: (seconds, seconds spent in
    the rules classifier alone, label counts)."""
    from actors.followup_classifier import FollowupClassifier
    from pipelines.stages.followups import label
    from pipelines.schema import CONVERSATIONS

    classifier = FollowupClassifier("rules")
    classify = classifier.rules.classify
    classify_s = 0.0

    def timed(items):
        nonlocal classify_s
        start = time.perf_counter()
        out = classify(items)
        classify_s += time.perf_counter() - start
        return out

    classifier.rules.classify = timed
    counts: Counter = Counter()
    out = Path(tempfile.mkdtemp(prefix="followups-single-"))
    start = time.perf_counter()
    for part in sorted(table_path(run_dir, "ingest", "conversations").glob("*.parquet")):
        labelled = label(classifier, pq.read_table(part, schema=CONVERSATIONS), batch_size)
        pq.write_table(labelled, out / part.name)
        counts.update(labelled.column("label").to_pylist())
    return time.perf_counter() - start, classify_s, counts


def model_backend_rates(run_dir: Path, sample: int) -> dict:
    """Follow-ups per second on one core of rules, learned and cascade(learned) on the same
    follow-ups, and the share the cascade sends to the model."""
    import torch
    from threadpoolctl import threadpool_limits

    from actors.followup_classifier import FollowupClassifier, asks_model

    rows = []
    for part in sorted(table_path(run_dir, "followups", "followups").glob("*.parquet")):
        rows += pq.read_table(part, columns=["context", "answer", "message"]).to_pylist()
        if len(rows) >= sample:
            break
    rows = rows[:sample]
    contexts, answers, messages = ([r[k] for r in rows] for k in ("context", "answer", "message"))
    torch.set_num_threads(1)
    rates = {}
    with threadpool_limits(1):
        for name, kwargs in (("rules", {}), ("learned", {}), ("cascade", {"cascade_model": "learned"})):
            classifier = FollowupClassifier(name, **kwargs)
            classifier.classify_batch(contexts[:64], answers[:64], messages[:64])  # warm-up
            start = time.perf_counter()
            labels = classifier.classify_batch(contexts, answers, messages)
            rates[name] = len(rows) / (time.perf_counter() - start)
            if name == "rules":
                rates["cascade_model_share"] = sum(map(asks_model, labels)) / len(rows)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 conversations (a few minutes)")
    parser.add_argument("--size", type=int, help="conversations to generate (default 200,000)")
    parser.add_argument("--workdir", type=Path, help="keep inputs here and reuse them")
    parser.add_argument("--model-sample", type=int, default=2000, metavar="N",
                        help="follow-ups the model backends are timed on (default 2000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv)
    size = args.size or (20_000 if args.quick else 200_000)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-followups-"))

    import ray

    from pipelines.stages.followups import run_followups

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_dir = prepare(workdir, size)
    single_s, classify_s, single_labels = single_process(run_dir, 512)
    start = time.perf_counter()
    summary = run_followups(config(run_dir))
    ray_s = time.perf_counter() - start
    ray.shutdown()
    if {k: v for k, v in single_labels.items()} != summary["labels"]:
        raise SystemExit(f"label counts differ: single {dict(single_labels)} vs ray {summary['labels']}")
    n = summary["followups"]
    rates = model_backend_rates(run_dir, args.model_sample)
    report = {
        "conversations": size, "followups": n,
        "single_s": round(single_s, 2), "ray_stage_s": round(ray_s, 2),
        "rules_per_s_single_core": round(n / classify_s),
        "followups_per_s_single": round(n / single_s), "followups_per_s_ray": round(n / ray_s),
        "speedup_ratio": round(single_s / ray_s, 3),
        "model_sample": args.model_sample,
        "one_core_per_s": {k: round(v) for k, v in rates.items() if k != "cascade_model_share"},
        "cascade_model_share": round(rates["cascade_model_share"], 3),
        "learned_over_rules_ratio": round(rates["learned"] / rates["rules"], 4),
        "cascade_over_rules_ratio": round(rates["cascade"] / rates["rules"], 4),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"{n} follow-ups from {size} conversations")
    print(f"  rules classifier alone, one core: {report['rules_per_s_single_core']:,} follow-ups/s")
    print(f"  single process (read, extract, label, write): {single_s:.1f} s, {report['followups_per_s_single']:,}/s")
    print(f"  Ray Data stage (read, extract, label in an actor pool, write): {ray_s:.1f} s, "
          f"{report['followups_per_s_ray']:,}/s")
    print(f"  speedup_ratio (single / Ray Data): {report['speedup_ratio']}")
    print(f"one core, the same {args.model_sample} follow-ups: "
          + ", ".join(f"{k} {v:,}/s" for k, v in report["one_core_per_s"].items())
          + f" (the cascade's model sees {report['cascade_model_share']:.1%} of them)")
    print(f"  learned_over_rules_ratio {report['learned_over_rules_ratio']}, "
          f"cascade_over_rules_ratio {report['cascade_over_rules_ratio']}")
    print(f"  load average {report['load_average']}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
