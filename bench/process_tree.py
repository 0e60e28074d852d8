"""Measuring a process and its descendants (a Ray run is a tree of processes): memory as
PSS, which counts each shared object-store page once; CPU seconds by process name; and a
wait for a quiet machine before timing. Used by bench/ingest.py."""
from __future__ import annotations

import time
from pathlib import Path

import psutil

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
