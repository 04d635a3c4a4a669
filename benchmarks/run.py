"""The CPU suite: one command measures SmolLM2-135M on this machine and writes the CPU section of docs/benchmarks.md.

    .venv/bin/python benchmarks/run.py --save-json benchmarks/results/cpu-x86-2core.json   # about 15 min
    .venv/bin/python benchmarks/run.py --quick --no-write     # fewer repeats and tokens (about 8 min), print only
    .venv/bin/python benchmarks/run.py --from-json benchmarks/results/cpu-x86-2core.json   # re-render a run
    .venv/bin/python benchmarks/run.py --save-json benchmarks/results/cpu-x86-2core.json --resume  # finish a run cut short

Each part runs in fresh child processes, and before each one the run waits (up to 2 minutes) until under half
a core is busy over 3 s; what it saw is recorded. Parts: memory bandwidth (cpu_bandwidth.py), the lowered model
against mlx-lm in f32, bf16 and 4-bit (cpu_compiler.py), llama.cpp on the bundled GGUF (llamacpp.py), lowering
and host overheads (cpu_overheads.py), where a decode step's CPU time goes (cpu_profile.py, where Linux
`perf` is installed), and end to end in vLLM, f32 and bf16: this plugin and vLLM's built-in
CPU platform (vllm_e2e.py).
The section is rendered by cpu_report.py between the markers <!-- cpu:begin --> and <!-- cpu:end -->.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_machine, log, write_doc_section
from cpu_report import COMPILER_DTYPES, DTYPE_NAMES, E2E_MODES, PROFILE_DTYPES, render


def plan(quick: bool) -> dict:
    if quick:
        return {"compiler": dict(prompt=256, gen=32, repeats=2), "llamacpp": dict(prompt=256, gen=32, repeats=2),
                "e2e": dict(levels="1,8,32", gen=32, repeats=1, dtypes="f32,bf16"), "bw_repeats": 5}
    return {"compiler": dict(prompt=512, gen=128, repeats=3), "llamacpp": dict(prompt=512, gen=128, repeats=3),
            "e2e": dict(levels="1,8,32", gen=128, repeats=2, dtypes="f32,bf16"), "bw_repeats": 7}


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
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_for_quiet(label: str, limit: float = 0.5, max_wait_s: float = 120.0) -> dict:
    """Wait (up to `max_wait_s`) until under `limit` cores are busy over 3 s (the 1-minute load average where
    /proc/stat is missing). Not the load average itself: it stays above 1 for a minute after the previous
    part's own work, which is not competition. Returns what was seen."""
    start = time.monotonic()

    def now():
        busy = busy_cores()
        return busy if busy is not None else os.getloadavg()[0]

    busy = first = now()
    while busy > limit and time.monotonic() - start < max_wait_s:
        log("bench", f"{label}: {busy:.2f} cores busy > {limit}: waiting")
        time.sleep(10)
        busy = now()
    return {"section": label, "busy_first": round(first, 2), "busy_start": round(busy, 2),
            "load_start": round(os.getloadavg()[0], 2), "waited_s": round(time.monotonic() - start, 1)}


def run_child(module: str, args: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """`python benchmarks/<module>.py args` in a fresh process; its last JSON line of stdout."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{module}.py"), *args]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        sys.stderr.write(out.stderr[-6000:])
        raise RuntimeError(f"{module} {' '.join(args)} failed with exit code {out.returncode}")
    result = json.loads([line for line in out.stdout.strip().splitlines() if line.startswith("{")][-1])
    result["child_wall_s"] = time.perf_counter() - start
    return result


def collect(args) -> dict:
    p = plan(args.quick)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]])
    res = {"machine": cpu_machine(), "date": now, "command": command, "plan": p, "loads": []}
    if args.resume and Path(args.save_json).exists():  # a run cut short: measure only the parts it lacks
        res = json.loads(Path(args.save_json).read_text())
        if res["plan"] != p or res["machine"] != cpu_machine():
            raise SystemExit(f"--resume: {args.save_json} was measured with another plan or on another machine")
        res.pop("stopped", None)
        res.setdefault("resumed", []).append({"date": now, "command": command})
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter() - res.get("total_s", 0.0)

    def save() -> None:  # after every part: a run cut short keeps what it measured
        Path(args.save_json).write_text(json.dumps(res, indent=1, default=str) + "\n")

    def part(label: str, module: str, argv: list[str], extra_env: dict | None = None, timeout: float = 900) -> dict:
        res["loads"].append(wait_for_quiet(label))
        log("bench", label)
        return run_child(module, argv, dict(env, **(extra_env or {})), timeout)

    if "bandwidth" not in res:
        res["bandwidth"] = part("bandwidth", "cpu_bandwidth", ["--threads", "2", "--repeats", str(p["bw_repeats"])])
    c = p["compiler"]
    for dt in [dt for dt in COMPILER_DTYPES if f"compiler_{dt}" not in res]:
        res[f"compiler_{dt}"] = part(f"compiler {dt}", "cpu_compiler", ["--dtype", dt, "--prompt", str(c["prompt"]),
                                                                        "--gen", str(c["gen"]), "--repeats", str(c["repeats"])])
        save()
    c = p["llamacpp"]
    if "llamacpp" not in res:
        res["llamacpp"] = part("llama.cpp", "llamacpp", ["--no-wait", "--prompt", str(c["prompt"]), "--gen",
                                                        str(c["gen"]), "--repeats", str(c["repeats"]), "--threads", "2"])
    if "overheads" not in res:
        res["overheads"] = part("overheads", "cpu_overheads", ["--dtype", "f32"])
    for dt in [dt for dt in PROFILE_DTYPES if f"profile_{dt}" not in res and shutil.which("perf")]:
        res[f"profile_{dt}"] = part(f"profile {dt}", "cpu_profile", ["--dtype", dt, "--seconds", "8"])
        save()
    res.setdefault("e2e", {})
    save()
    if not args.skip_e2e:
        e = p["e2e"]
        for dt in e["dtypes"].split(","):
            done = res["e2e"].setdefault(dt, {})
            for mode, (_, mode_env) in [(m, v) for m, v in E2E_MODES.items() if m not in done]:
                res["e2e"][dt][mode] = part(f"vLLM {mode} {dt}", "vllm_e2e", [
                    "--mode", mode, "--dtype", DTYPE_NAMES[dt], "--concurrency", e["levels"], "--gen", str(e["gen"]),
                    "--repeats", str(e["repeats"])], mode_env, timeout=1200)
                save()
    res["total_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and new tokens (the section says so)")
    ap.add_argument("--skip-e2e", action="store_true", help="skip the vLLM engines")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write docs/benchmarks.md")
    ap.add_argument("--from-json", help="render a run's results file instead of measuring")
    ap.add_argument("--resume", action="store_true",
                    help="measure only the parts missing from the --save-json results (a run cut short) and add them")
    ap.add_argument("--save-json", default=os.path.join(tempfile.gettempdir(), "vllm-metal-cpu-bench.json"),
                    help="where the results go (default: %(default)s; the committed ones: "
                         "benchmarks/results/cpu-x86-2core.json)")
    args = ap.parse_args()
    if args.from_json:
        path = Path(args.from_json)
        res = json.loads(path.read_text())
    else:
        path = Path(args.save_json)
        res = collect(args)
        path.write_text(json.dumps(res, indent=1, default=str) + "\n")
        log("bench", f"results in {path}")
    path = path.resolve()
    text = render(res, path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    print(text)
    if not args.no_write:
        write_doc_section("cpu", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
