"""The CPU kernels of runtime/kernels/cpu_ext.py against MLX's own ops, and the machine's copy bandwidth.

    .venv/bin/python benchmarks/cpu_kernels.py [--repeats 15] [--shapes 4096x4096,14336x4096,49152x576]
                                               [--rows 1,8,32] [--threads N] [--json out.json]

For each weight shape (N x K) and rows of x (M): ours q4 / q8 (affine, group 64, bfloat16 scales and
biases), bf16 and f32 weights against `mx.quantized_matmul`, `mx.matmul` on bfloat16 and on float32
(OpenBLAS through runtime/blas.py). x is bfloat16 for the bf16 and quantized weights, float32 for f32.

Bandwidth is counted in the bytes of the weights as stored (quantized: packed values + scales + biases):
GB/s = bytes / time. The copy bandwidth is measured in the same run (torch, as many threads as the
kernels use, 2 * bytes / time: each byte read once and written once, 1 GiB buffers). Each timed call
evaluates one product per copy of the weights, with enough copies (>= 256 MB) that they do not stay in
the last-level cache; time = median over repeats / copies. Other processes on the machine add noise:
numbers are medians, with the min-max over repeats.
"""

import runtime  # noqa: F401  (first: points MLX at the optimized BLAS)

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from runtime.kernels import cpu_ext

GROUP = 64
MIN_BYTES = 256 << 20  # weights per timed call, well beyond the last-level cache


def copy_bandwidth(threads: int, repeats: int = 7) -> dict:
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 28, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    b.copy_(a)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        rates.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    del a, b
    return _stats(rates)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays)


def weight_sets(n: int, k: int) -> dict:
    """{variant: (list of weight copies, bytes per copy)}; every copy holds different values."""
    out = {}
    base = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
    mx.eval(base)
    for name in ("q4", "q8", "bf16", "f32"):
        if name in ("q4", "q8"):
            one = mx.quantize(base, group_size=GROUP, bits=4 if name == "q4" else 8)
        elif name == "bf16":
            one = (base,)
        else:
            one = (base.astype(mx.float32),)
        size = _nbytes(one)
        copies = max(2, -(-MIN_BYTES // size))
        sets = [tuple(a + mx.zeros_like(a) for a in one) for _ in range(copies)]  # distinct buffers
        mx.eval(sets)
        out[name] = (sets, size)
    del base
    return out


def variants(name: str):
    """(ours, mlx) callables f(x, weights) for a weight variant."""
    if name in ("q4", "q8"):
        bits = 4 if name == "q4" else 8
        return (
            lambda x, w: cpu_ext.quantized_matmul(x, *w, group_size=GROUP, bits=bits),
            lambda x, w: mx.quantized_matmul(x, *w, transpose=True, group_size=GROUP, bits=bits),
        )
    return (lambda x, w: cpu_ext.linear(x, w[0]), lambda x, w: x @ w[0].T)


def time_per_product(fn, x, sets, repeats: int) -> dict:
    t = time.perf_counter()
    mx.eval(fn(x, sets[0]))  # warm-up
    if time.perf_counter() - t > 0.05:  # compute-bound and slow (MLX's own quantized/bf16 GEMM): cache
        sets, repeats = sets[:1], min(repeats, 3)  # effects do not matter, time does
    mx.eval([fn(x, w) for w in sets])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval([fn(x, w) for w in sets])
        times.append((time.perf_counter() - t) / len(sets))
    return _stats(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="4096x4096,14336x4096,49152x576")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--variants", default="q4,q8,bf16,f32")
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    cpu_ext.set_num_threads(args.threads)
    threads = cpu_ext.num_threads()
    mx.set_default_device(mx.cpu)
    copy = copy_bandwidth(threads)
    print(f"kernels: {cpu_ext.isa()}, {threads} threads; copy bandwidth {copy['median']:.1f} GB/s "
          f"({copy['min']:.1f}-{copy['max']:.1f}), median of repeats; the machine is shared, expect noise")
    print(f"{'shape':>11} {'M':>3} {'weights':>7} {'ours ms':>8} {'GB/s':>6} {'of copy':>7} "
          f"{'MLX ms':>8} {'GB/s':>6} {'MLX/ours':>8}")
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        sets_by_variant = weight_sets(n, k)
        for m in (int(v) for v in args.rows.split(",")):
            for name in args.variants.split(","):
                sets, size = sets_by_variant[name]
                x = mx.random.normal((m, k)).astype(mx.float32 if name == "f32" else mx.bfloat16)
                mx.eval(x)
                ours_fn, mlx_fn = variants(name)
                ours = time_per_product(ours_fn, x, sets, args.repeats)
                theirs = time_per_product(mlx_fn, x, sets, max(3, args.repeats // 3))
                gbs = size / ours["median"] / 1e9
                row = {"n": n, "k": k, "m": m, "weights": name, "bytes": size, "ours_s": ours,
                       "mlx_s": theirs, "ours_gb_s": gbs, "mlx_gb_s": size / theirs["median"] / 1e9,
                       "of_copy": gbs / copy["median"], "mlx_over_ours": theirs["median"] / ours["median"]}
                rows.append(row)
                print(f"{shape:>11} {m:>3} {name:>7} {ours['median'] * 1e3:8.3f} {gbs:6.1f} "
                      f"{row['of_copy']:7.0%} {theirs['median'] * 1e3:8.3f} {row['mlx_gb_s']:6.1f} "
                      f"{row['mlx_over_ours']:7.1f}x", flush=True)
        del sets_by_variant
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"isa": cpu_ext.isa(), "threads": threads, "copy_gb_s": copy, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
