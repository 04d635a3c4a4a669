"""Where a step's time goes on the GPU: the host's share (recording the graph, `mx.async_eval` until it
returns, the wait for the tokens) and the CUDA kernels of a step with their GPU time, through CUPTI
(torch's profiler sees every CUDA kernel of the process, MLX's included).

Systems: ours, ours_nojit (the same step uncompiled), ours with kernels off (benchmarks/gpu_variants.py)
and mlx_lm; a decode step at batch --batch, or a batch-1 prefill of --prefill tokens.
"""

from __future__ import annotations

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from common import ResultsFile, log
from gpu_ab import decode_split, medians, step_split
from gpu_systems import Artefact, MlxLm, Ours, mlx_setup, part_name
from gpu_variants import VARIANTS, variant_step
from gpu_workloads import BLOCK, PROMPT, WARMUP, load_config, prompts_for
from lowering.compile import load_step
from runtime.config import parse_quantize_spec


def cuda_kernels(fn, steps: int) -> dict | None:
    """The CUDA kernels `fn` launches, through CUPTI: per step, their count and GPU time, and the 15 costliest;
    None where torch sees no CUDA device."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = {}
    for e in kernels:
        total[e.name] = total.get(e.name, 0.0) + e.device_time / 1e3
    top = sorted(total.items(), key=lambda kv: -kv[1])[:15]
    return {"per_step": len(kernels) / steps, "gpu_ms_per_step": sum(total.values()) / steps,
            "top": [(n[:80], round(t / steps, 4)) for n, t in top]}


def prefill_split(system, prompt) -> dict:
    """A batch-1 prefill's host split (record, launch, wait for the last token's argmax) and its kernels."""
    for _ in range(2):  # traces and cuDNN plans for this shape
        system.prefill_last(prompt)
    splits = []
    for _ in range(10):
        (_, handle), split = step_split(lambda: system.record_prefill(prompt))
        system.release(handle)
        splits.append(split)
    out = medians(splits)
    out["kernels"] = cuda_kernels(lambda: system.prefill_last(prompt), steps=1)
    return out


def system_for(label: str, artefact: Artefact, weights: dict, blocks: int, cfg: dict, config):
    if label == "mlx_lm":
        return MlxLm(cfg, weights, artefact.quantized)
    steps = {"ours": lambda: None, "ours_nojit": lambda: load_step(artefact.source, jit=False),
             **{v: (lambda v=v: variant_step(artefact.source, v, config)) for v in VARIANTS}}
    if label in steps:
        return Ours(artefact.source, artefact.layers, weights, mx.bfloat16, blocks, steps[label](), label)
    raise SystemExit(f"unknown system {label!r}; known: ours, ours_nojit, mlx_lm, {', '.join(VARIANTS)}")


def main(args) -> int:
    config = mlx_setup(args.device)
    quantize = parse_quantize_spec(args.quantize, "--quantize")
    for name in args.models.split(","):
        cfg = load_config(name)
        artefact = Artefact(args.artefacts, name, quantize=quantize)
        weights = artefact.random_weights(mx.bfloat16, seed=1)
        blocks = max(args.batch * (256 // BLOCK), args.prefill // BLOCK) + 64
        model = part_name(name, quantize)
        what = f"{model} prefill {args.prefill}" if args.prefill else f"{model} decode batch {args.batch}"
        res = ResultsFile(args.out, "profile", what, model=name, batch=1 if args.prefill else args.batch,
                          prefill=args.prefill)
        for label in args.systems.split(","):
            system = system_for(label, artefact, weights, blocks, cfg, config)
            try:
                if args.prefill:
                    row = prefill_split(system, prompts_for(cfg["vocab_size"], 1, args.prefill, seed=3)[0])
                else:
                    state = system.start(prompts_for(cfg["vocab_size"], args.batch, PROMPT, seed=7))
                    system.decode(state, WARMUP, pipelined=False)
                    row = decode_split(system, state, 24)
                    row["kernels"] = cuda_kernels(lambda: system.decode(state, 4, pipelined=False), steps=4)
                    system.finish(state)
                res.add(system=label, **row)
                k = row["kernels"] or {"per_step": 0, "gpu_ms_per_step": 0, "top": "(no CUDA device)"}
                log("profile", f"{what} {label}: {row['record']:.2f} + {row['launch']:.2f} + {row['wait']:.2f} ms; "
                    f"{k['per_step']:.0f} kernels, {k['gpu_ms_per_step']:.2f} ms GPU; top: {k['top'][:4]}")
            except Exception as exc:  # noqa: BLE001  one system's failure must not lose the others
                res.error(f"{what} {label}", exc)
            del system
            mx.clear_cache()
        del weights
    return 0
