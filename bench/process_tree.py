"""Measuring a command and every process it starts (a Ray run is a tree of processes):
memory as PSS, which counts each shared object-store page once; CPU seconds by process
name; the CPU other work on the machine took meanwhile; and a wait for a quiet machine
before timing. bench/ingest.py measures its runs with `run_sampled`; on its own:

    .venv/bin/python bench/process_tree.py --quick [--json]        # a local Ray, one task
    .venv/bin/python bench/process_tree.py [--json] -- .venv/bin/rlhi run --config configs/default.yaml

prints the command's peak tree PSS split by process, its CPU seconds by process and the
load average. `--json`'s last line has `tree_over_driver_ratio`: the tree's peak PSS over
the command's own process at that moment (how much of a Ray run's memory lives outside
the driver).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# The --quick command: a local Ray started, one task run, Ray stopped.
RAY_ONE_TASK = ("import ray; ray.init(num_cpus=1, include_dashboard=False); "
                "print(ray.get(ray.remote(lambda: 1).remote())); ray.shutdown()")


def tree_pss_mb(pid: int) -> tuple[float, dict[str, float]]:
    """PSS of a process and all its descendants in MB, and the same split by process name
    (Ray names its workers after what they run, e.g. "ray::MapWorker(CheckWorker)")."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0, {}
    by_name: dict[str, float] = {}
    for proc in procs:
        try:
            name = "driver" if proc.pid == pid else process_label(proc)
            by_name[name] = by_name.get(name, 0.0) + proc.memory_full_info().pss / 2**20
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sum(by_name.values()), by_name


def process_label(proc: psutil.Process) -> str:
    """A short, stable name: Ray workers by their title ("ray::_StatsActor"), other Python
    processes by their script ("python dashboard.py"), the rest by executable name."""
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].removesuffix(".submit")
    if proc.name().startswith("python") and len(cmd) > 1:
        script = next((Path(arg).name for arg in cmd[1:] if arg.endswith(".py")), "")
        return f"python {script}".strip()
    return proc.name()


def cpu_by_name(pairs) -> dict[str, float]:
    totals: dict[str, float] = {}
    for name, seconds in pairs:
        totals[name] = totals.get(name, 0.0) + seconds
    return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def wait_for_quiet(max_wait_s: float = 180.0, idle_cores: float = 0.25) -> None:
    """Wait until the machine is nearly idle, so other work on the 2 cores does not skew
    the timing; give up after `max_wait_s` (the table's "other CPU s" shows what remained)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_cpu_s()
        time.sleep(1.0)
        busy = busy_cpu_s() - before
        if busy < idle_cores:
            return
        if time.monotonic() > deadline:
            print(f"  (machine still busy: {busy:.1f} cores in use by others; measuring anyway)", flush=True)
            return


def own_cpu_s() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def busy_cpu_s() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def tree_cpu_s(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of a process and its descendants: pid -> (name, seconds)."""
    out = {}
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            times = proc.cpu_times()
            out[proc.pid] = ("driver" if proc.pid == pid else process_label(proc), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


@dataclass
class Sampled:
    """What `run_sampled` saw of one command."""

    returncode: int
    samples: list[tuple[float, float]] = field(default_factory=list)   # (time, tree PSS MB)
    peak_pss_mb: float = 0.0
    peak_split: dict[str, float] = field(default_factory=dict)         # process name -> PSS MB at the peak
    cpu_s: float = 0.0                                                  # the tree's CPU, start-up included
    cpu_by_process_s: dict[str, float] = field(default_factory=dict)
    other_cpu_s: float = 0.0                                            # the machine's CPU spent on anything else
    load_avg: tuple[float, float] = (0.0, 0.0)                          # 1-minute load at start and end


def run_sampled(command: list[str], cwd: Path | str, log_path: Path, every_s: float = 0.5) -> Sampled:
    """Run `command` in its own session (output to `log_path`) once the machine is quiet,
    sampling its process tree's PSS and CPU every `every_s` until it exits; killed with all
    it started if this process is interrupted."""
    wait_for_quiet()
    load_start = os.getloadavg()[0]
    busy_before, own_before = busy_cpu_s(), own_cpu_s()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        samples, cpu_by_pid, peak, peak_split = [], {}, 0.0, {}
        try:
            while proc.poll() is None:
                pss, split = tree_pss_mb(proc.pid)
                samples.append((time.time(), pss))
                if pss > peak:
                    peak, peak_split = pss, split
                cpu_by_pid.update(tree_cpu_s(proc.pid))
                time.sleep(every_s)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # the subprocess's own group: it and what it started
            raise
    busy_s = busy_cpu_s() - busy_before - (own_cpu_s() - own_before)
    cpu_s = sum(cpu for _, cpu in cpu_by_pid.values())
    return Sampled(proc.returncode, samples, peak, peak_split, cpu_s, cpu_by_name(cpu_by_pid.values()),
                   max(0.0, busy_s - cpu_s), (round(load_start, 2), round(os.getloadavg()[0], 2)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="measure a local Ray running one task")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not command:
        if not args.quick:
            parser.error("give the command to measure after --, or --quick")
        command = [sys.executable, "-c", RAY_ONE_TASK]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"process-tree-{os.getpid()}.log"
    sampled = run_sampled(command, Path.cwd(), log_path)
    if sampled.returncode != 0:
        print(f"process_tree: the command failed (exit {sampled.returncode}); log {log_path}:\n"
              + log_path.read_text()[-3000:], file=sys.stderr)
        return 1
    driver = sampled.peak_split.get("driver", 0.0)
    print(f"peak tree PSS {sampled.peak_pss_mb:.0f} MB (driver {driver:.0f} MB), CPU {sampled.cpu_s:.1f} s, "
          f"other CPU {sampled.other_cpu_s:.1f} s, load {sampled.load_avg[0]} -> {sampled.load_avg[1]}")
    for name, mb in sorted(sampled.peak_split.items(), key=lambda kv: -kv[1]):
        print(f"  {mb:7.0f} MB  {sampled.cpu_by_process_s.get(name, 0.0):7.1f} CPU s  {name}")
    if args.json:
        print(json.dumps({"peak_pss_mb": round(sampled.peak_pss_mb, 1), "driver_pss_mb": round(driver, 1),
                          "tree_over_driver_ratio": round(sampled.peak_pss_mb / driver, 2) if driver else None,
                          "cpu_s": round(sampled.cpu_s, 1), "cpu_by_process_s": sampled.cpu_by_process_s,
                          "other_cpu_s": round(sampled.other_cpu_s, 1), "load_avg": sampled.load_avg}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
