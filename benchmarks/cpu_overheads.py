"""What the lowered SmolLM2 costs beyond its math on MLX's CPU backend, in a fresh process:

- lowering: each stage once, cold (build vLLM's model, capture, passes, emit, weights -> MLX + KV cache, the
  first prefill + 16 decode steps with `mx.compile` tracing each new shape), and `lower_cached` as the plugin
  calls it, a miss (into a fresh cache folder) then a hit;
- host time of a batch-1 decode step: the driver's StepInput, the step's arrays (`LoweredModel.step_args`:
  numpy, then one host-to-device array), calling the compiled step (graph replay), `mx.eval` (the math);
  medians over 48 steps, and a cProfile of 8 more. Prints one JSON line.

    .venv/bin/python benchmarks/cpu_overheads.py --dtype f32
"""

from __future__ import annotations

import runtime  # noqa: F401  (first: the optimized BLAS for MLX's CPU backend before mlx.core)

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import mlx.core as mx
from transformers import AutoTokenizer

from cpu_compiler import DTYPES, Ours, bench, prompt_tokens
from lowering.api import lower_cached
from lowering.capture import capture_vllm
from lowering.vllm_build import build_vllm_model
from weights.bundled import prepare

PARTS = ("prepare", "step_args", "call", "eval")


def host_split(ours: Ours, prompt: list[int], steps: int = 48) -> dict:
    """Decode steps split into their host parts and the evaluation; medians in seconds."""
    drv, model = ours.driver, ours.model
    seq_id, row = ours.prefill(prompt)
    seq = drv.seqs[seq_id]
    parts = {k: [] for k in (*PARTS, "total")}
    for _ in range(steps):
        seq.tokens.append(int(mx.argmax(row).item()))
        t0 = time.perf_counter()
        batch = drv.prepare({seq_id: 1})
        t1 = time.perf_counter()
        args = model.step_args(batch, model.kv)
        t2 = time.perf_counter()
        logits, model.kv = model.step_fn(*args)
        t3 = time.perf_counter()
        mx.eval(logits, model.kv)
        t4 = time.perf_counter()
        row = logits[0]
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            parts[k].append(v)
    prof = cProfile.Profile()  # where the host time goes, top functions by own time
    prof.enable()
    for _ in range(8):
        seq.tokens.append(int(mx.argmax(row).item()))
        row = drv.step({seq_id: 1})[seq_id]
    prof.disable()
    ours.done(seq_id)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
    med = {k: statistics.median(v) for k, v in parts.items()}
    host = sum(med[k] for k in PARTS if k != "eval")
    return {"median_s": med, "host_s": host, "host_pct": 100 * host / med["total"],
            "profile_top": buf.getvalue().splitlines()[:30]}


def lower_cached_times(path: str, dtype: str, max_len: int) -> dict:
    """lower_cached, as the plugin calls it: a miss into a fresh cache folder, then a hit."""
    os.environ["VLLM_METAL_CACHE"] = tempfile.mkdtemp(prefix="bench-lowered-")
    model, config = build_vllm_model(path, dtype=DTYPES[dtype], max_model_len=max_len)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    identity = {"front": "vllm", "model": path, "dtype": dtype, "bench": True}
    out = {}
    for label in ("miss", "hit"):
        t = time.perf_counter()
        *_, info = lower_cached(identity, lambda: capture_vllm(model, config), state)
        out[label] = {"cache": info["cache"], "s": time.perf_counter() - t}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="f32")
    args = p.parse_args()
    path, max_len = str(prepare("smollm2")), 1024
    ours = Ours(path, args.dtype, max_len)
    prompt = prompt_tokens(AutoTokenizer.from_pretrained(path), 128)
    t = time.perf_counter()
    bench(ours, prompt, 16)  # includes mx.compile tracing of the prefill and decode shapes
    lowering = {**ours.timings, "first_run_s": time.perf_counter() - t}
    host = host_split(ours, prompt)
    del ours
    print(json.dumps({"dtype": args.dtype, "lowering": lowering, "host": host,
                      "lower_cached": lower_cached_times(path, args.dtype, max_len)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
