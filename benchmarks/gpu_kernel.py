"""A kernel alone on the GPU (`gpu.py kernel`): with --kernel quantized, the quantized GEMV (gpu_qgemv.py);
by default the paged decode attention, 8B attention shape (32 heads, 8 KV heads, D 128, bf16, block
16): GPU time per call through CUPTI of the kernel table's `attend_decode` at each (warps, keys in flight)
of the CUDA kernel (RuntimeConfig.paged_kernel_tune, env MLX_PAGED_KERNEL_TUNE), of the generic path (the
kernel off: a gather of the blocks and a masked SDPA) and of MLX's decode SDPA on a contiguous, unmasked
cache (what mlx-lm runs). Prints the tune whose worst ratio to the per-batch best is smallest.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import torch

import gpu_qgemv
from common import ResultsFile, log
from gpu_profile import cuda_kernels
from gpu_systems import mlx_setup
from gpu_workloads import BLOCK
from runtime.kernels import select

KV_HEADS, HEADS, HEAD_DIM = 8, 32, 128


def inputs(batch: int, context: int, seed: int) -> dict:
    """A cache holding `batch` sequences of `context` tokens in shuffled blocks, their block table and queries."""
    rng = np.random.default_rng(seed)
    used = -(-context // BLOCK)
    width = 1 << (used - 1).bit_length()
    num_blocks = batch * used + 1
    table = np.zeros((batch, width), np.int32)
    table[:, :used] = rng.permutation(np.arange(1, num_blocks)).reshape(batch, used)
    cache = mx.concatenate([(mx.random.normal((1, KV_HEADS, num_blocks, BLOCK, HEAD_DIM)) * 0.5),
                            mx.random.normal((1, KV_HEADS, num_blocks, BLOCK, HEAD_DIM))]).astype(mx.bfloat16)
    group = {"blocks": mx.array(table), "q_pos": mx.full((batch, 1), context - 1, mx.int32),
             "key_pos": mx.arange(width * BLOCK, dtype=mx.int32)}
    q = mx.random.normal((batch, HEADS, HEAD_DIM)).astype(mx.bfloat16)
    contiguous = mx.random.normal((batch, KV_HEADS, context, HEAD_DIM)).astype(mx.bfloat16)
    mx.eval(cache, q, contiguous, group)
    return {"cache": cache, "group": group, "q": q, "contiguous": contiguous}


def main(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit("gpu.py kernel times CUDA kernels through CUPTI (torch's profiler): torch sees no CUDA device")
    if args.kernel == "quantized":
        return gpu_qgemv.main(args)
    config = mlx_setup("gpu")
    res = ResultsFile(args.out, "kernel", "paged decode attention", context=args.context)
    tunes = [tuple(int(x) for x in c.split("x")) for c in args.tunes.split(",")]
    scale = HEAD_DIM ** -0.5
    times: dict[str, dict[int, float]] = {}
    for b in [int(x) for x in args.batches.split(",")]:
        x = inputs(b, args.context, seed=b)
        runs = {f"{w}x{u}": select(replace(config, paged_kernel_tune=(w, u))) for w, u in tunes}
        runs["generic"] = select(replace(config, kernels_off=config.kernels_off | {"paged_decode"}))
        calls = {label: (lambda t=t: t.attend_decode(x["q"], x["cache"], x["group"], scale=scale, window=-1, cap=0.0))
                 for label, t in runs.items()}
        calls["mlx_sdpa_contiguous"] = lambda: mx.fast.scaled_dot_product_attention(
            x["q"][:, :, None], x["contiguous"], x["contiguous"], scale=scale)
        want = calls["generic"]().astype(mx.float32)
        for label, fn in calls.items():
            try:
                if label in runs:  # a wrong kernel must not win on speed
                    err = mx.abs(fn().astype(mx.float32) - want).max().item()
                    assert err < 3e-2, f"{label}: max abs error {err} against the generic path"
                for _ in range(3):
                    mx.eval(fn())
                k = cuda_kernels(lambda: [mx.eval(fn()) for _ in range(20)], steps=20)
                us = k["gpu_ms_per_step"] * 1e3
                times.setdefault(label, {})[b] = us
                res.add(config=label, batch=b, gpu_us=us, kernels=k["per_step"], top=k["top"][:4])
                log("kernel", f"b={b} context={args.context} {label}: {us:.1f} us GPU, {k['per_step']:.0f} kernels")
            except Exception as exc:  # noqa: BLE001
                res.error(f"{label} b={b}", exc)
    tuned = {c: v for c, v in times.items() if c[0].isdigit() and len(v) == len(times["generic"])}
    best = {b: min(v[b] for v in tuned.values()) for b in times["generic"]}
    pick = min(tuned, key=lambda c: max(tuned[c][b] / best[b] for b in best))
    res.part["best"] = pick
    res.save()
    print(pick.replace("x", ","))
    return 0
