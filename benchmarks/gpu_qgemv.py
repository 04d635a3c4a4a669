"""The quantized GEMV alone on the GPU (`gpu.py kernel --kernel quantized`): GPU time per call through CUPTI of
our kernel (runtime/kernels/cuda_quantized.py), MLX's `mx.quantized_matmul` on the same 4-bit weights (group
64, bf16 scales, as mx.quantize makes them) and MLX's bf16 GEMV (`x @ w.T`) on the full-precision weights, for
the 8B shape's decode matrices at M rows of activations; the bandwidth each reaches (bytes of the codes,
scales, biases, activations and output over the time); and, at M = 1, our kernel at each (warps, rows) block
shape against the one `tune_for` picks.

Every call reads another copy of the weights (copies enough to exceed the L2 cache several times), so the
times are of weights streamed from device memory. Each side is checked against MLX's own result first.
"""

from __future__ import annotations

import time

import mlx.core as mx

from common import ResultsFile, log
from gpu_profile import cuda_kernels
from gpu_systems import mlx_setup
from runtime.kernels import cuda_quantized

# the 8B shape's decode matrices (N, K): the step reads q/k/v, o, gate/up, down, lm_head
SHAPES = {"q_proj, o_proj": (4096, 4096), "k_proj, v_proj": (1024, 4096), "gate_proj, up_proj": (14336, 4096),
          "down_proj": (4096, 14336), "lm_head": (128256, 4096)}
BITS, GROUP = 4, 64
STREAM_BYTES = 400 << 20  # weight copies per shape: L2 is 50-60 MB
TUNES = [(4, 4), (4, 2), (4, 1), (2, 4), (1, 4)]


def _copies(n: int, k: int) -> list[dict]:
    count = max(2, min(64, STREAM_BYTES // (n * k * BITS // 8)))
    out = []
    for i in range(count):
        w = (mx.random.normal((n, k), key=mx.random.key(i)) * 0.02).astype(mx.bfloat16)
        wq, scales, biases = mx.quantize(w, group_size=GROUP, bits=BITS)
        mx.eval(w, wq, scales, biases)
        out.append({"w": w, "q": (wq, scales, biases)})
    return out


def _gpu_us(fn, copies: list[dict]) -> float:
    """GPU time per call, through CUPTI, over 3 passes through the copies (after one untimed pass)."""
    mx.eval([fn(c) for c in copies])
    calls = 3 * len(copies)
    k = cuda_kernels(lambda: [mx.eval(fn(copies[i % len(copies)])) for i in range(calls)], steps=calls)
    return k["gpu_ms_per_step"] * 1e3


def main(args) -> int:
    mlx_setup("gpu")
    res = ResultsFile(args.out, "kernel", "quantized gemv", bits=BITS, group_size=GROUP)
    rows = [int(m) for m in args.rows.split(",") if m]
    for label, (n, k) in SHAPES.items():
        copies = _copies(n, k)
        for m in rows:
            x = mx.random.normal((m, k), key=mx.random.key(1000 + m)).astype(mx.bfloat16)
            mx.eval(x)
            q_bytes = n * k * BITS // 8 + 2 * 2 * n * (k // GROUP)
            io = 2 * m * (k + n)
            sides = {
                "ours": (lambda c, x=x: cuda_quantized.quantized_matmul(x, *c["q"], bits=BITS, group_size=GROUP),
                         q_bytes),
                "mlx_q4": (lambda c, x=x: mx.quantized_matmul(x, *c["q"], transpose=True, group_size=GROUP, bits=BITS),
                           q_bytes),
                "mlx_bf16": (lambda c, x=x: x @ c["w"].T, n * k * 2),
            }
            t = time.perf_counter()
            want = sides["mlx_q4"][0](copies[0]).astype(mx.float32)
            mx.eval(want)
            first_s = time.perf_counter() - t  # MLX builds its quantized kernels on first use
            scale = mx.abs(want).max().item()
            for side, (fn, weight_bytes) in sides.items():
                try:
                    if side == "ours":  # a wrong kernel must not win on speed
                        err = mx.abs(fn(copies[0]).astype(mx.float32) - want).max().item()
                        assert err <= 2e-2 * scale, f"max abs error {err} against mx.quantized_matmul (max {scale})"
                    us = _gpu_us(fn, copies)
                    gb_s = (weight_bytes + io) / us / 1e3
                    res.add(shape=label, n=n, k=k, m=m, side=side, gpu_us=us, GB_s=gb_s,
                            first_call_s=first_s if side == "mlx_q4" else None)
                    log("qgemv", f"{label} {n}x{k} M={m} {side}: {us:.1f} us, {gb_s:.0f} GB/s")
                except Exception as exc:  # noqa: BLE001  one side's failure must not lose the others
                    res.error(f"{label} M={m} {side}", exc)
            if m == 1:
                default = cuda_quantized.tune_for(m, n, k, BITS)
                for tune in TUNES:
                    try:
                        us = _gpu_us(lambda c, x=x, tune=tune: cuda_quantized.quantized_matmul(
                            x, *c["q"], bits=BITS, group_size=GROUP, tune=tune), copies)
                        res.add(shape=label, n=n, k=k, m=m, side=f"tune {tune[0]}x{tune[1]}", gpu_us=us,
                                GB_s=(q_bytes + io) / us / 1e3, default=tune == default)
                        log("qgemv", f"{label} M={m} tune {tune}{' (default)' if tune == default else ''}: {us:.1f} us")
                    except Exception as exc:  # noqa: BLE001
                        res.error(f"{label} M={m} tune {tune}", exc)
        del copies
        mx.clear_cache()
    return 0
