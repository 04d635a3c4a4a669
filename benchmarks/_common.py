"""Shared helpers of benchmarks/run.py: load gating, statistics, machine facts, child processes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def busy_cores(window_s: float = 3.0) -> float | None:
    """Cores' worth of CPU time used by everything over the last `window_s` (/proc/stat), None if unknown."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_quiet(label: str, limit: float = 0.5, max_wait_s: float = 120.0) -> dict:
    """Wait (up to `max_wait_s`) until the machine is quiet: under `limit` cores busy over 3 s (the 1-minute
    load average where /proc/stat is missing). Not the load average itself: it stays above 1 for a minute
    after the previous section's own work, which is not competition. Returns what was seen."""
    start = time.monotonic()

    def now():
        busy = busy_cores()
        return busy if busy is not None else os.getloadavg()[0]

    busy = first = now()
    while busy > limit and time.monotonic() - start < max_wait_s:
        print(f"  [{label}] {busy:.2f} cores busy > {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(10)
        busy = now()
    waited = time.monotonic() - start
    return {"section": label, "busy_first": round(first, 2), "busy_start": round(busy, 2),
            "load_start": round(os.getloadavg()[0], 2), "waited_s": round(waited, 1)}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def fmt(s: dict | None, digits: int = 1, unit: str = "") -> str:
    """'median (min-max)'."""
    if not s:
        return "n/a"
    d = digits
    return f"{s['median']:.{d}f}{unit} ({s['min']:.{d}f}-{s['max']:.{d}f})"


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "mem_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def run_child(module: str, args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run `python benchmarks/<module>.py args` in a fresh process; its last stdout line is JSON."""
    full_env = dict(os.environ, **(env or {}))
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{module}.py"), *args]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        sys.stderr.write(out.stderr[-6000:])
        raise RuntimeError(f"{module} {' '.join(args)} failed with exit code {out.returncode}")
    lines = [l for l in out.stdout.strip().splitlines() if l.startswith("{")]
    result = json.loads(lines[-1])
    result["child_wall_s"] = time.perf_counter() - start
    return result
