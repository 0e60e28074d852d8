"""Benchmark: the ingest stage on Ray Data against the single-process pyarrow baseline.

    .venv/bin/python bench/ingest.py            # 50,000 and 200,000 conversations
    .venv/bin/python bench/ingest.py --quick    # 12,500 and 50,000
    .venv/bin/python bench/ingest.py --sizes 20000 80000 --json --keep --workdir /tmp/b

Top to bottom:
1. generate a WildChat-schema input per size (bench/wildchat_synth.py: perturbed text,
   Zipf users, duplicates, toxic rows), or reuse it from --workdir;
2. per size, run the stage twice, each time in a fresh subprocess so its memory is its own:
   `single` is `run_ingest(use_ray=False)`, the same checks, duplicates, cap and redaction
   one task after another in one process; `ray` is `run_ingest(use_ray=True)` on a local
   Ray with num_cpus=2. The stage is timed inside the subprocess, after imports and Ray
   start-up (reported apart); at the larger size `ray_unredacted` runs the Ray Data ingest
   once more with `ingest.redact: []`, the baseline of what redaction costs;
3. memory: `single` reports its peak RSS; for `ray` this process samples, every 0.5 s, the
   PSS of the subprocess and all its descendants (GCS, raylet with the object store, the
   workers), which counts each shared object-store page once, and reports the peak;
   the driver's own peak (its RSS in `ray` mode) at both sizes gives its growth per million
   input rows;
4. fail loudly unless both modes give the same counts, then print a table, the speedup at
   both sizes and an extrapolation to WildChat-1M from the per-row time at the larger size;
5. profile the redactor in this process over a sample of the larger input, each detector
   timed alone, for each kind's share of redaction time.
Each run notes the machine's load average (1 min) when it starts and ends: the 2 cores are
shared, and other work there makes every time longer.

`--json` prints one JSON object as the last line of stdout. Two keys end in `_ratio`:
`speedup_ratio`, single seconds over Ray Data seconds at the larger size, and
`redaction_overhead_ratio`, Ray Data seconds with redaction over Ray Data seconds without
it, at the larger size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import process_tree  # bench/process_tree.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
WILDCHAT_1M = 838_000
FULL_SIZES, QUICK_SIZES = (50_000, 200_000), (12_500, 50_000)
MODES = ("single", "ray")
UNREDACTED = "ray_unredacted"  # the Ray Data ingest with `ingest.redact: []`, at the larger size
PROFILE_ROWS = 2_000  # rows of the larger input the per-detector profile redacts
NUM_CPUS = 2
SAMPLE_EVERY_S = 0.5
COUNT_KEYS = ("rows_in", "kept", "filtered", "rejected", "users", "redacted")
INGEST_MODULES = ("stages/ingest/*.py", "config/*.py", "redact*.py", "schema.py", "runtime.py", "contract.py")


# --- inside the measured subprocess ------------------------------------------------------

def _timed(phases: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def child(mode: str, input_dir: str, run_dir: str, result_path: str) -> None:
    """Run the stage once and write what was measured to `result_path` (JSON)."""
    import pipelines.stages.ingest.stage as ingest
    from pipelines.config import parse_config
    from pipelines.runtime import start_ray

    ingest_settings = {"inputs": [input_dir], **({"redact": []} if mode == UNREDACTED else {})}
    config = parse_config({"run_dir": run_dir, "ingest": ingest_settings,
                           "resources": {"num_cpus": NUM_CPUS, "progress_bars": False}})
    result: dict[str, Any] = {"mode": mode, "code": code_fingerprint()}
    if mode != "single":
        start = time.perf_counter()
        start_ray(config.resources)
        result["ray_start_s"] = time.perf_counter() - start
        result["ray_idle_mb"] = process_tree.tree_pss_mb(os.getpid())[0]
    # Phase timings, by wrapping the stage's own steps (nothing in pipelines/ changes).
    phases: dict[str, float] = {}
    for name in ("plan", "check_with_ray", "check_in_process", "finalize", "summarize"):
        setattr(ingest, name, _timed(phases, name.replace("_with_ray", "").replace("_in_process", ""),
                                     getattr(ingest, name)))
    result["stage_started"] = time.time()
    start = time.perf_counter()
    summary = ingest.run_ingest(config, use_ray=(mode != "single"))
    result["stage_s"] = time.perf_counter() - start
    result["stage_ended"] = time.time()
    result["phases_s"] = {name: round(seconds, 2) for name, seconds in phases.items()}
    result["counts"] = {key: summary[key] for key in COUNT_KEYS}
    result["conversations_per_user"] = summary["conversations_per_user"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if mode != "single":
        import ray

        ray.shutdown()
    Path(result_path).write_text(json.dumps(result))


# --- in the benchmark process ------------------------------------------------------------

def measure(mode: str, input_dir: Path, workdir: Path, size: int) -> dict[str, Any]:
    """Run one mode in a fresh subprocess, sampling its process tree's memory and CPU."""
    run_dir, result_path = workdir / f"run-{mode}-{size}", workdir / f"result-{mode}-{size}.json"
    log_path = workdir / f"log-{mode}-{size}.txt"
    shutil.rmtree(run_dir, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", mode, str(input_dir), str(run_dir), str(result_path)]
    sampled = process_tree.run_sampled(command, ROOT, log_path, SAMPLE_EVERY_S)
    if sampled.returncode != 0 or not result_path.exists():
        tail = log_path.read_text()[-4000:]
        raise SystemExit(f"bench: {mode} run on {size:,} rows failed (exit {sampled.returncode}); "
                         f"log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    in_stage = [pss for t, pss in sampled.samples if result["stage_started"] <= t <= result["stage_ended"]]
    result.update(size=size, load_avg=sampled.load_avg, peak_pss_mb=sampled.peak_pss_mb,
                  peak_pss_stage_mb=max(in_stage, default=0.0),
                  peak_pss_by_process_mb={k: round(v) for k, v in sorted(sampled.peak_split.items(),
                                                                        key=lambda kv: -kv[1])},
                  cpu_s=sampled.cpu_s,  # this run's processes, start-up included
                  cpu_by_process_s=sampled.cpu_by_process_s,
                  # CPU the machine spent on anything but this run: other users of the 2 cores.
                  other_cpu_s=sampled.other_cpu_s)
    result["peak_mb"] = result["peak_rss_mb"] if mode == "single" else result["peak_pss_mb"]
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def prepare_input(workdir: Path, size: int, seed: int) -> tuple[Path, float]:
    """The generated input for one size: reused when --workdir already holds it."""
    sys.path.insert(0, str(Path(__file__).parent))
    import wildchat_synth

    folder = workdir / f"wildchat-{size}-seed{seed}"
    marker = folder / "GENERATED.json"
    stamp = {"rows": size, "seed": seed,
             "generator": hashlib.sha256(Path(wildchat_synth.__file__).read_bytes()).hexdigest()[:16]}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return folder / "data", 0.0
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    wildchat_synth.generate(folder / "data", size, seed)
    marker.write_text(json.dumps(stamp))
    return folder / "data", time.perf_counter() - start


def check_same_counts(single: dict[str, Any], ray: dict[str, Any]) -> None:
    if single["code"] != ray["code"]:
        raise SystemExit(f"bench: pipelines/ changed between the two runs on {single['size']:,} rows "
                         f"(code {single['code']} then {ray['code']}); rerun when nobody edits it")
    if single["counts"] != ray["counts"]:
        diff = {k: (single["counts"][k], ray["counts"][k]) for k in COUNT_KEYS
                if single["counts"][k] != ray["counts"][k]}
        raise SystemExit(f"bench: the two modes disagree on {single['size']:,} rows "
                         f"(single, ray): {json.dumps(diff)}; this is a bug in the stage")


def check_same_rows(redacted: dict[str, Any], unredacted: dict[str, Any]) -> None:
    """Redaction changes text, never which rows are kept: every count but `redacted` agrees."""
    diff = {k: (redacted["counts"][k], unredacted["counts"][k]) for k in COUNT_KEYS
            if k != "redacted" and redacted["counts"][k] != unredacted["counts"][k]}
    if diff or redacted["code"] != unredacted["code"]:
        raise SystemExit(f"bench: the ingest with and without redaction disagree on {redacted['size']:,} rows "
                         f"(with, without): {json.dumps(diff)} (code {redacted['code']}, {unredacted['code']})")


def profile_redaction(input_dir: Path, rows: int = PROFILE_ROWS) -> dict[str, Any]:
    """CPU seconds per detector over the turns of the first `rows` rows of the input, each
    detector timed alone, in this process (one core)."""
    import pyarrow.parquet as pq

    from pipelines.redact import Redactor

    first = pq.ParquetFile(sorted(input_dir.glob("*.parquet"))[0])
    batch = next(first.iter_batches(batch_size=rows, columns=["conversation"]))
    texts = [t for t in batch.column(0).flatten().field("content").to_pylist() if t]
    load_start = os.getloadavg()[0]
    seconds = Redactor().detector_seconds(texts)
    total = sum(seconds.values())
    return {"rows": batch.num_rows, "turns": len(texts), "chars": sum(map(len, texts)),
            "load_avg": (round(load_start, 2), round(os.getloadavg()[0], 2)),
            "seconds": {kind: round(t, 3) for kind, t in seconds.items()},
            "share": {kind: round(t / total, 3) for kind, t in seconds.items()}}


def code_fingerprint() -> str:
    """A hash of the modules the stage runs, so numbers can be tied to the code that
    produced them (others may edit pipelines/ while a long benchmark runs)."""
    digest = hashlib.sha256()
    for path in sorted(p for pattern in INGEST_MODULES for p in (ROOT / "pipelines").glob(pattern)):
        digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_report(runs: dict[tuple[str, int], dict[str, Any]], sizes: tuple[int, int],
                 generate_s: dict[int, float], profile: dict[str, Any]) -> dict[str, Any]:
    small, large = sizes
    codes = sorted({run["code"] for run in runs.values()})
    report: dict[str, Any] = {"sizes": list(sizes), "num_cpus": NUM_CPUS, "code": ",".join(codes)}
    for mode in MODES:
        for label, size in (("small", small), ("large", large)):
            run = runs[(mode, size)]
            report[f"seconds_{mode}_{label}"] = round(run["stage_s"], 2)
            report[f"rows_per_s_{mode}_{label}"] = round(size / run["stage_s"], 1)
            report[f"peak_mb_{mode}_{label}"] = round(run["peak_mb"], 1)
        report[f"extrapolated_wildchat1m_s_{mode}"] = round(runs[(mode, large)]["stage_s"] / large * WILDCHAT_1M, 1)
    report["speedup_ratio"] = round(report["seconds_single_large"] / report["seconds_ray_large"], 3)
    report["speedup_small_ratio"] = round(report["seconds_single_small"] / report["seconds_ray_small"], 3)
    report["seconds_ray_unredacted_large"] = round(runs[(UNREDACTED, large)]["stage_s"], 2)
    report["redaction_overhead_ratio"] = round(report["seconds_ray_large"] / report["seconds_ray_unredacted_large"], 3)
    report["redaction_detector_share"] = profile["share"]
    report["redaction_profile"] = profile
    # The driver is the `ray` subprocess itself: its peak RSS, at both sizes.
    driver_mb = [runs[("ray", size)]["peak_rss_mb"] for size in sizes]
    report["driver_peak_mb_small"], report["driver_peak_mb_large"] = (round(mb, 1) for mb in driver_mb)
    report["driver_mb_per_million_rows"] = round((driver_mb[1] - driver_mb[0]) / (large - small) * 1e6, 1)
    report["load_avg_max"] = max(max(run["load_avg"]) for run in runs.values())
    for label, size in (("small", small), ("large", large)):
        report[f"ray_start_s_{label}"] = round(runs[("ray", size)]["ray_start_s"], 2)
        report[f"ray_idle_mb_{label}"] = round(runs[("ray", size)]["ray_idle_mb"], 1)
    report["counts_large"] = runs[("single", large)]["counts"]
    report["generate_s"] = {str(size): round(s, 1) for size, s in generate_s.items()}
    report["runs"] = [{key: (round(value, 2) if isinstance(value, float) else value)
                       for key, value in run.items() if key not in ("counts", "stage_started", "stage_ended")}
                      for run in runs.values()]
    return report


def print_table(report: dict[str, Any], runs: dict[tuple[str, int], dict[str, Any]]) -> None:
    small, large = report["sizes"]
    print(f"\ningest benchmark, {NUM_CPUS} CPUs, code {report['code']}")
    print(f"{'rows':>9} {'mode':<14} {'stage s':>8} {'rows/s':>8} {'ms/row':>7} {'peak MB':>8} "
          f"{'ray up s':>8} {'CPU s':>7} {'other CPU s':>11} {'load 1m':>11}  phases s")
    for (mode, size), run in sorted(runs.items(), key=lambda item: item[0][1]):
        ray_up = f"{run['ray_start_s']:.1f}" if mode != "single" else "-"
        phases = " ".join(f"{k}={v}" for k, v in run["phases_s"].items())
        load = "{:.1f}->{:.1f}".format(*run["load_avg"])
        print(f"{size:>9,} {mode:<14} {run['stage_s']:>8.1f} {size / run['stage_s']:>8.0f} "
              f"{1000 * run['stage_s'] / size:>7.2f} {run['peak_mb']:>8.0f} {ray_up:>8} "
              f"{run['cpu_s']:>7.1f} {run['other_cpu_s']:>11.1f} {load:>11}  {phases}")
    print("CPU s: CPU time of the run's own processes (start-up included); other CPU s: CPU time "
          "the machine spent on anything else meanwhile (other users of the cores skew the times)")
    print("peak MB: single = peak RSS of the process; ray = peak PSS of the driver and all Ray "
          f"processes (object store included); Ray idle after start-up: {report['ray_idle_mb_small']:.0f} MB")
    split = runs[("ray", large)]["peak_pss_by_process_mb"]
    print(f"Ray peak at {large:,} rows by process (MB): " + ", ".join(f"{k} {v}" for k, v in split.items()))
    cpu = runs[("ray", large)]["cpu_by_process_s"]
    print(f"Ray CPU s at {large:,} rows by process: " + ", ".join(f"{k} {v}" for k, v in list(cpu.items())[:8]))
    print(f"speedup (single s / Ray Data s): {report['speedup_small_ratio']:.2f} at {small:,} rows, "
          f"{report['speedup_ratio']:.2f} at {large:,} rows")
    for mode in MODES:
        growth = report[f"peak_mb_{mode}_large"] / report[f"peak_mb_{mode}_small"]
        print(f"peak memory {mode:<6}: {report[f'peak_mb_{mode}_small']:.0f} MB -> "
              f"{report[f'peak_mb_{mode}_large']:.0f} MB for {large / small:.0f}x the rows (x{growth:.2f})")
    print(f"redaction overhead (Ray Data s with redaction / without) at {large:,} rows: "
          f"{report['redaction_overhead_ratio']:.2f} ({report['seconds_ray_large']:.1f} s / "
          f"{report['seconds_ray_unredacted_large']:.1f} s)")
    profile = report["redaction_profile"]
    print(f"redaction time by detector ({profile['rows']:,} rows, {profile['turns']:,} turns, one core, "
          "load 1m {:.1f}->{:.1f}): ".format(*profile["load_avg"])
          + ", ".join(f"{kind} {share:.0%} ({profile['seconds'][kind]:.2f} s)" for kind, share in profile["share"].items()))
    print(f"driver peak RSS (ray mode): {report['driver_peak_mb_small']:.0f} MB at {small:,} rows, "
          f"{report['driver_peak_mb_large']:.0f} MB at {large:,} rows: "
          f"{report['driver_mb_per_million_rows']:.1f} MB per million input rows")
    for mode in MODES:
        seconds = report[f"extrapolated_wildchat1m_s_{mode}"]
        print(f"WildChat-1M ({WILDCHAT_1M:,} rows) at the {large:,}-row rate, {mode:<6}: "
              f"{seconds:,.0f} s ({seconds / 60:.1f} min)")
    print(f"highest load average (1 min) seen at a run's start or end: {report['load_avg_max']:.1f} "
          f"on {NUM_CPUS} cores (above {NUM_CPUS}, other work slowed these runs)")
    counts = report["counts_large"]
    print(f"counts at {large:,} rows (same in both modes): kept {counts['kept']:,}, "
          f"filtered {counts['filtered']}, rejected {counts['rejected']}, users {counts['users']:,}, "
          f"redacted {counts['redacted']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--sizes", nargs=2, type=int, metavar=("N", "M"), help="the two sizes (M >= 4 N)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line last")
    parser.add_argument("--keep", action="store_true", help="keep the generated data (and the work folder)")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new one under /tmp)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)

    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    if sizes[1] < 4 * sizes[0] or sizes[0] < 1:
        parser.error(f"--sizes {sizes[0]} {sizes[1]}: the second size must be at least 4 times the first")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rlhi-bench-ingest-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    generate_s: dict[int, float] = {}
    for size in sizes:  # on failure everything stays in workdir, logs included
        input_dir, generate_s[size] = prepare_input(workdir, size, args.seed)
        print(f"{size:,} rows: input {input_dir} ({generate_s[size]:.1f} s to generate)", flush=True)
        for mode in MODES:
            runs[(mode, size)] = measure(mode, input_dir, workdir, size)
            run = runs[(mode, size)]
            print(f"  {mode:<6} {run['stage_s']:7.1f} s  peak {run['peak_mb']:6.0f} MB", flush=True)
        check_same_counts(runs[("single", size)], runs[("ray", size)])
    runs[(UNREDACTED, sizes[1])] = run = measure(UNREDACTED, input_dir, workdir, sizes[1])
    print(f"  {UNREDACTED} {run['stage_s']:7.1f} s  peak {run['peak_mb']:6.0f} MB", flush=True)
    check_same_rows(runs[("ray", sizes[1])], run)
    profile = profile_redaction(input_dir)
    if args.keep:
        print(f"kept {workdir}")
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:  # a folder the user named: remove only what this run put there
        for path in workdir.glob("wildchat-*-seed*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in [*workdir.glob("result-*.json"), *workdir.glob("log-*.txt")]:
            path.unlink()
    report = build_report(runs, sizes, generate_s, profile)
    print_table(report, runs)
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
