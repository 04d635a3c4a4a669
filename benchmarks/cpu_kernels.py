"""The CPU kernels of runtime/kernels/cpu_ext.py against MLX's own ops, and the machine's copy bandwidth.

    .venv/bin/python benchmarks/cpu_kernels.py [--cases matmul,attention,decode] [--repeats 15]
                                               [--shapes 4096x4096,14336x4096,49152x576]
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

`attention`: the CPU kernel table's decode attention with the compiled kernel (`cpu_ext.paged_decode_attention`,
reading the paged cache in place) against the same table with `cpu_attention` off (the generic composed path:
gather every sequence's K/V blocks, mask, attend), both under `mx.compile`, on SmolLM2's shapes (9 query heads,
3 KV heads, head dim 64, blocks of 16) for batches x contexts, float32 and bfloat16 caches. Each timed call
evaluates one attention per copy of the cache (up to 30 copies, as a step's layers, within 256 MB).

`decode`: a SmolLM2 decode step (lowered, float32 and bfloat16; `--decode-batches` sequences with
`--decode-context` tokens of context) with the kernel table's `cpu_attention` on and off, the same step input
timed alternately in one process; the largest logit difference between the two is printed too.
"""

import runtime  # noqa: F401  (first: points MLX at the optimized BLAS)

import argparse
import json
import statistics
import sys
import time

import mlx.core as mx

from runtime import kernels
from runtime.config import RuntimeConfig
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


# ---------------------------------------------------------------- paged decode attention

ATTN_HEADS, ATTN_KV_HEADS, ATTN_DIM, ATTN_BLOCK = 9, 3, 64, 16  # SmolLM2-135M


def attention_tables():
    """The CPU kernel table with the compiled decode attention, and with it off (the generic composed path)."""
    return (kernels.select(RuntimeConfig(device="cpu")),
            kernels.select(RuntimeConfig(device="cpu", kernels_off=frozenset({"cpu_attention"}))))


def attention_inputs(t: int, ctx: int, dtype, seed: int = 0):
    """q [T, H, D], per-sequence blocks scattered over the cache, and the group arrays runtime.model.device_batch
    makes once per step (so the composed path does not build them per call)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = -(-ctx // ATTN_BLOCK)
    num_blocks = t * n + 1
    blocks = rng.permutation(num_blocks)[: t * n].reshape(t, n).astype(np.int32)
    planes = np.arange(2 * ATTN_KV_HEADS)[:, None, None] * num_blocks
    group = {"q_pos": mx.array(np.full((t, 1), ctx - 1, np.int32)), "blocks": mx.array(blocks),
             "key_pos": mx.arange(n * ATTN_BLOCK, dtype=mx.int32),
             "block_rows": mx.array((planes + blocks[None]).reshape(-1).astype(np.int32))}
    q = mx.random.normal((t, ATTN_HEADS, ATTN_DIM)).astype(dtype)
    shape = (2, ATTN_KV_HEADS, num_blocks, ATTN_BLOCK, ATTN_DIM)
    return q, shape, group


def attention_fn(table):
    def attend(q, cache, q_pos, blocks, key_pos, block_rows):
        group = {"q_pos": q_pos, "blocks": blocks, "key_pos": key_pos, "block_rows": block_rows}
        return table.attend_decode(q, cache, group, scale=ATTN_DIM ** -0.5, window=-1, cap=0.0)
    return mx.compile(attend)


def time_attention(fn, q, caches, group, repeats: int) -> dict:
    args = (group["q_pos"], group["blocks"], group["key_pos"], group["block_rows"])
    mx.eval([fn(q, c, *args) for c in caches])  # warm-up (and the trace)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval([fn(q, c, *args) for c in caches])
        times.append((time.perf_counter() - t) / len(caches))
    return _stats(times)


def attention_rows(batches, contexts, repeats: int) -> list[dict]:
    on, off = attention_tables()
    ours_fn, generic_fn = attention_fn(on), attention_fn(off)
    print(f"\npaged decode attention, H={ATTN_HEADS} KVH={ATTN_KV_HEADS} D={ATTN_DIM} block {ATTN_BLOCK}: "
          "the kernel vs the generic composed path (gather + mask + attention), mx.compile, ms per layer")
    print(f"{'cache':>8} {'T':>3} {'context':>7} {'ours ms':>8} {'generic ms':>10} {'generic/ours':>12} {'max diff':>9}")
    rows = []
    for dtype_name, dtype in (("float32", mx.float32), ("bfloat16", mx.bfloat16)):
        for t in batches:
            for ctx in contexts:
                q, shape, group = attention_inputs(t, ctx, dtype)
                size = 2 * ATTN_KV_HEADS * shape[2] * ATTN_BLOCK * ATTN_DIM * dtype.size
                copies = max(1, min(30, MIN_BYTES // size))
                caches = [mx.random.normal(shape).astype(dtype) for _ in range(copies)]
                mx.eval(caches)
                args = (q, caches[0], group["q_pos"], group["blocks"], group["key_pos"], group["block_rows"])
                diff = mx.abs(ours_fn(*args).astype(mx.float32) - generic_fn(*args).astype(mx.float32)).max().item()
                ours = time_attention(ours_fn, q, caches, group, repeats)
                generic = time_attention(generic_fn, q, caches, group, max(3, repeats // 2))
                row = {"cache": dtype_name, "t": t, "context": ctx, "ours_s": ours, "generic_s": generic,
                       "generic_over_ours": generic["median"] / ours["median"], "max_diff": diff}
                rows.append(row)
                print(f"{dtype_name:>8} {t:>3} {ctx:>7} {ours['median'] * 1e3:8.3f} {generic['median'] * 1e3:10.3f} "
                      f"{row['generic_over_ours']:11.1f}x {diff:9.2g}", flush=True)
                del caches
    return rows


def prefill_rows(chunks, context: int, repeats: int) -> list[dict]:
    """A chunk of Lq new tokens of one sequence over `context` earlier ones (chunked prefill): the kernel table's
    `attend_group` with `cpu_prefill` on (the kernel, a query at a time) and off (gather + mask + attention)."""
    import numpy as np

    from runtime.kernels import cpu

    cpu.PREFILL_MIN_QUERIES = 1  # the kernel at every chunk size: this measures where it starts to pay
    on = kernels.select(RuntimeConfig(device="cpu"))
    off = kernels.select(RuntimeConfig(device="cpu", kernels_off=frozenset({"cpu_prefill"})))
    print(f"\nchunked prefill, one sequence, {context} tokens of context before the chunk, float32 cache: "
          "attend_group with cpu_prefill on vs off, mx.compile, ms per layer")
    print(f"{'Lq':>5} {'on ms':>8} {'off ms':>8} {'off/on':>7} {'max diff':>9}")
    rows = []
    for lq in chunks:
        total = context + lq
        q, shape, group = attention_inputs(1, total, mx.float32)
        q = mx.random.normal((lq, ATTN_HEADS, ATTN_DIM))
        group = dict(group, q_index=mx.arange(lq, dtype=mx.int32)[None],
                     q_pos=mx.arange(context, total, dtype=mx.int32)[None])
        cache = mx.random.normal(shape)
        mx.eval(q, cache)

        def make(table):
            def attend(q, cache, q_index, q_pos, blocks, key_pos, block_rows):
                g = {"q_index": q_index, "q_pos": q_pos, "blocks": blocks, "key_pos": key_pos, "block_rows": block_rows}
                return table.attend_group(q, None, None, cache, g, scale=ATTN_DIM ** -0.5, window=-1, cap=0.0,
                                          in_order=True)
            return mx.compile(attend)

        args = (q, cache, group["q_index"], group["q_pos"], group["blocks"], group["key_pos"], group["block_rows"])
        fns = {"on": make(on), "off": make(off)}
        outs = {name: fn(*args) for name, fn in fns.items()}
        diff = mx.abs(outs["on"] - outs["off"]).max().item()
        times = {name: [] for name in fns}
        for _ in range(max(3, repeats // 2)):
            for name, fn in fns.items():
                t = time.perf_counter()
                mx.eval(fn(*args))
                times[name].append(time.perf_counter() - t)
        on_s, off_s = _stats(times["on"]), _stats(times["off"])
        row = {"lq": lq, "context": context, "on_s": on_s, "off_s": off_s, "off_over_on": off_s["median"] / on_s["median"],
               "max_diff": diff}
        rows.append(row)
        print(f"{lq:>5} {on_s['median'] * 1e3:8.3f} {off_s['median'] * 1e3:8.3f} {row['off_over_on']:6.2f}x {diff:9.2g}",
              flush=True)
    return rows


# ---------------------------------------------------------------- a SmolLM2 decode step


def decode_rows(dtypes, batches, context: int, repeats: int) -> list[dict]:
    """SmolLM2 decode steps with `cpu_attention` on and off: one model (weights, cache, prefilled context) whose
    step function is swapped between two compiled steps on the same kernel table but for the switch."""
    import numpy as np

    from lowering.api import build_model, lower
    from lowering.capture import capture_vllm
    from lowering.compile import load_step
    from lowering.driver import Driver
    from lowering.vllm_build import build_vllm_model
    from weights.bundled import prepare

    on, off = attention_tables()
    path = str(prepare("smollm2"))
    print(f"\nSmolLM2-135M decode step, context {context}: decode attention compiled (on) vs composed (off), "
          "ms per step (median), same step input, alternating")
    print(f"{'dtype':>8} {'batch':>5} {'on ms':>8} {'off ms':>8} {'off/on':>7} {'logit diff':>10}")
    rows = []
    for dtype in dtypes:
        model, config = build_vllm_model(path, dtype=dtype, max_model_len=context + 64)
        lowered = lower(capture_vllm(model, config, name="SmolLM2-135M"))
        del model
        for batch in batches:
            lm = build_model(lowered, num_blocks=batch * (-(-(context + 16) // 16)) + 2, block_size=16, jit=True)
            steps = {"on": load_step(lowered.source, kernels=on), "off": load_step(lowered.source, kernels=off)}
            driver = Driver(lm)
            rng = np.random.default_rng(0)
            for seq in range(batch):
                driver.add(seq, [int(x) for x in rng.integers(20, 20000, context)])
                driver.step({seq: context})  # prefill one at a time (bounded memory)
                driver.seqs[seq].tokens.append(1)
            step_input = driver.prepare({seq: 1 for seq in range(batch)})
            logits, times = {}, {"on": [], "off": []}
            for name, fn in steps.items():
                lm.step_fn = fn
                logits[name] = np.array(lm.step(step_input).astype(mx.float32))
                lm.step(step_input)
            for _ in range(repeats):
                for name, fn in steps.items():
                    lm.step_fn = fn
                    t = time.perf_counter()
                    lm.step(step_input)
                    times[name].append(time.perf_counter() - t)
            on_s, off_s = _stats(times["on"]), _stats(times["off"])
            diff = float(np.abs(logits["on"] - logits["off"]).max())
            row = {"dtype": dtype, "batch": batch, "context": context, "on_s": on_s, "off_s": off_s,
                   "off_over_on": off_s["median"] / on_s["median"], "logit_diff": diff}
            rows.append(row)
            print(f"{dtype:>8} {batch:>5} {on_s['median'] * 1e3:8.1f} {off_s['median'] * 1e3:8.1f} "
                  f"{row['off_over_on']:6.2f}x {diff:10.2g}", flush=True)
            del lm, driver
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="matmul,attention,decode")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shapes", default="4096x4096,14336x4096,49152x576")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--variants", default="q4,q8,bf16,f32")
    ap.add_argument("--attention-batches", default="1,8,32")
    ap.add_argument("--attention-contexts", default="128,1024,4096")
    ap.add_argument("--prefill-chunks", default="16,128,512")
    ap.add_argument("--prefill-context", type=int, default=1024)
    ap.add_argument("--decode-dtypes", default="float32,bfloat16")
    ap.add_argument("--decode-batches", default="1,8")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: all CPUs)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    cases = set(args.cases.split(","))
    unknown = sorted(cases - {"matmul", "attention", "decode"})
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)}; choose from matmul, attention, decode")
    cpu_ext.set_num_threads(args.threads)
    threads = cpu_ext.num_threads()
    mx.set_default_device(mx.cpu)
    result = {"isa": cpu_ext.isa(), "threads": threads}
    print(f"kernels: {cpu_ext.isa()}, {threads} threads; the machine is shared, expect noise")
    if "matmul" in cases:
        result["copy_gb_s"], result["rows"] = matmul_rows(args, threads)
    if "attention" in cases:
        result["attention"] = attention_rows([int(v) for v in args.attention_batches.split(",")],
                                             [int(v) for v in args.attention_contexts.split(",")], args.repeats)
        result["prefill"] = prefill_rows([int(v) for v in args.prefill_chunks.split(",")], args.prefill_context,
                                         args.repeats)
    if "decode" in cases:
        result["decode"] = decode_rows(args.decode_dtypes.split(","), [int(v) for v in args.decode_batches.split(",")],
                                       args.decode_context, max(5, args.repeats // 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def matmul_rows(args, threads: int) -> tuple[dict, list[dict]]:
    copy = copy_bandwidth(threads)
    print(f"copy bandwidth {copy['median']:.1f} GB/s ({copy['min']:.1f}-{copy['max']:.1f}), median of repeats")
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
    return copy, rows

if __name__ == "__main__":
    sys.exit(main())
