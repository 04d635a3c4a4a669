"""float32 matmul speed of MLX and torch on this machine, and which BLAS MLX uses.

    .venv/bin/python benchmarks/sgemm.py [--size 1024] [--repeats 30] [--compare /path/to/libblas.so]

Measures in this process (MLX pointed at OpenBLAS by `import runtime`), then in child processes with
the two traps: OPENBLAS_CORETYPE=Prescott (OpenBLAS's generic kernels, what Debian's OpenBLAS falls back
to on CPUs it does not recognise) and VLLM_METAL_BLAS=none (the reference BLAS MLX's Linux wheel bundles).
GFLOP/s = 2*n^3 / time; median over repeats after warm-up, with min-max. `--compare LIB` also times MLX's
matmul through another BLAS (e.g. the system OpenBLAS against the scipy-openblas32 wheel's), alternating
with the chosen one in this process, and prints the ratio.
"""

import runtime  # noqa: F401  (first: loads the optimized BLAS before mlx.core)

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import torch

import runtime.blas
from common import cpu_machine


def _gflops(fn, n: int, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def measure(n: int, repeats: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a_mx, b_mx = mx.array(a_np), mx.array(b_np)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    mx.eval(a_mx, b_mx)
    with mx.stream(mx.cpu):
        mlx = _gflops(lambda: mx.eval(mx.matmul(a_mx, b_mx)), n, repeats, warmup)
    with torch.inference_mode():
        tch = _gflops(lambda: torch.mm(a_t, b_t), n, repeats, warmup)
    return {"mlx": mlx, "torch": tch, "blas": runtime.blas.report()}


def library_ab(n: int, repeats: int, other: str) -> dict:
    """MLX's matmul through the BLAS preload() chose and through `other`, alternating in this process:
    rounds of a few calls each, in alternating order, so that load on the machine hits both alike. Returns the
    medians."""
    rng = np.random.default_rng(1)
    a, b = (mx.array(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    mx.eval(a, b)
    libs = {"chosen": runtime.blas.report()["loaded"], "other": other}
    times: dict[str, list[float]] = {k: [] for k in libs}
    for i in range(repeats):
        for key in (("chosen", "other") if i % 2 == 0 else ("other", "chosen")):  # neither always goes first
            lib = libs[key]
            runtime.blas.use_library(lib)
            with mx.stream(mx.cpu):
                mx.eval(mx.matmul(a, b))  # warm-up after the switch
                t0 = time.perf_counter()
                for _ in range(3):
                    mx.eval(mx.matmul(a, b))
            times[key].append((time.perf_counter() - t0) / 3)
    runtime.blas.use_library(libs["chosen"])
    gflops = {k: 2 * n**3 / statistics.median(v) / 1e9 for k, v in times.items()}
    return {"libraries": libs, "gflops": gflops, "ratio": gflops["chosen"] / gflops["other"], "rounds": repeats}


def machine() -> str:
    m = cpu_machine()
    return f"{platform.system()} {platform.machine()}, {m['cores']} cores, {m['cpu']}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compare", metavar="LIBRARY", help="also time MLX's matmul through this BLAS library against "
                   "the chosen one, alternating in this process (e.g. the system OpenBLAS)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # print JSON, for the parent
    args = p.parse_args()
    load = os.getloadavg()[0]
    if args.child:
        print(json.dumps(measure(args.size, args.repeats, args.warmup)))
        return

    n = args.size
    rows = [("default (runtime.blas)", measure(n, args.repeats, args.warmup))]
    if sys.platform.startswith("linux"):
        # The traps, each in a fresh process (the BLAS is chosen once per process): OpenBLAS on its generic
        # kernels (what Debian's OpenBLAS picks on CPUs it does not know), and MLX's bundled reference BLAS
        # (far slower: fewer repeats).
        for label, var, value, repeats in (
            ("OPENBLAS_CORETYPE=Prescott", "OPENBLAS_CORETYPE", "Prescott", 10),
            ("VLLM_METAL_BLAS=none", "VLLM_METAL_BLAS", "none", 5),
        ):
            env = dict(os.environ, **{var: value})
            cmd = [sys.executable, __file__, "--child", "--size", str(n), "--repeats", str(repeats), "--warmup", "1"]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows.append((label, json.loads(out.splitlines()[-1])))

    print(f"machine: {machine()}; load average before: {load:.2f} (other processes share these cores)")
    print(f"python {platform.python_version()}, mlx {mx.__version__}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"sgemm float32 {n}x{n} @ {n}x{n}, GFLOP/s: median (min-max) over the given repeats\n")
    print(f"| {'BLAS setting':<26} | {'MLX sgemm library':<48} | {'MLX':>22} | {'torch':>22} |")
    print(f"|{'-' * 28}|{'-' * 50}|{'-' * 24}|{'-' * 24}|")
    for label, r in rows:
        blas = r["blas"]
        lib = os.path.basename(blas["sgemm_library"])
        lib += " (reference)" if blas["reference_blas"] else f" ({blas['openblas_core']})" if blas["openblas_core"] else ""
        cells = [f"{m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f}) x{m['repeats']}" for m in (r["mlx"], r["torch"])]
        print(f"| {label:<26} | {lib:<48} | {cells[0]:>22} | {cells[1]:>22} |")
    print(f"\nBLAS report (this process): {json.dumps(rows[0][1]['blas'])}")
    if args.compare:
        ab = library_ab(n, args.repeats, args.compare)
        names = {k: os.path.basename(v) for k, v in ab["libraries"].items()}
        print(f"\nsame process, alternating ({ab['rounds']} rounds of 3 calls): MLX sgemm through {names['chosen']} "
              f"{ab['gflops']['chosen']:.1f} GFLOP/s, through {names['other']} {ab['gflops']['other']:.1f} GFLOP/s, "
              f"ratio {ab['ratio']:.2f}")


if __name__ == "__main__":
    main()
