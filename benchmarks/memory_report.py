"""Memory report for SmolLM2-135M: weights, KV bytes per block, planned blocks, and process RSS while
the model goes torch -> lowered MLX (torch copy dropped). Each dtype runs in its own process so that
peak RSS belongs to that dtype alone.

    .venv/bin/python benchmarks/memory_report.py            # f32 and bf16, markdown tables
    .venv/bin/python benchmarks/memory_report.py --dtype bf16 --json
"""

from __future__ import annotations

import runtime  # noqa: F401  (fast BLAS before mlx)

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import time

import mlx.core as mx
import torch
from transformers import AutoModelForCausalLM

from lowering import capture
from lowering.api import build_model, lower
from lowering.driver import Driver
from runtime import memory
from runtime.model import LoweredModel
from weights.bundled import prepare

DTYPES = ("f32", "bf16")
MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_BATCHED = 8192, 256, 2048  # vLLM's defaults for SmolLM2 here


def _rss(stages: list, name: str) -> None:
    stages.append((name, memory.process_memory()))


def measure(dtype_name: str) -> dict:
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    stages: list = []
    _rss(stages, "imports done")
    path = prepare("smollm2")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    torch_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    _rss(stages, "torch model loaded")
    t = time.perf_counter()
    lowered = lower(capture.capture_hf(model, name="SmolLM2-135M"))
    _rss(stages, f"captured + lowered ({time.perf_counter() - t:.0f} s)")
    small = build_model(lowered, num_blocks=1, block_size=16)  # weights -> MLX; cache sized below
    _rss(stages, "MLX weights built (torch copy still alive)")
    del model, lowered
    gc.collect()
    _rss(stages, "torch copy dropped (del + gc.collect)")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise; shows what is really live
    _rss(stages, "after malloc_trim(0)")

    from runtime.device import device_memory_bytes

    wb = memory.weights_bytes(small.weights)
    device = device_memory_bytes("cpu")
    dims = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, hidden_size=576, num_heads=9,
                max_num_batched_tokens=MAX_BATCHED)
    plans = {str(f): memory.plan_kv_blocks(small.layout, wb, f, device, **dims).as_dict() for f in (0.1, "auto")}

    lm = LoweredModel(small.step_fn, small.weights, small.layout, plans["auto"]["num_blocks"])
    del small
    gc.collect()
    _rss(stages, "KV cache allocated at `auto` (blocks: above)")
    driver = Driver(lm)
    mx.reset_peak_memory()
    out = driver.generate({0: list(range(10, 522)), 1: list(range(5, 69))}, 4, chunk=256)
    _rss(stages, "after 512+64-token prefill, 4 decode steps")
    return {
        "dtype": dtype_name,
        "torch_param_bytes": torch_bytes,
        "weights_bytes": wb,
        "bytes_per_block": lm.layout.bytes_per_block(),
        "device_bytes": device,
        "plans": plans,
        "mlx_step_peak_above_steady": int(mx.get_peak_memory() - wb - lm.num_blocks * lm.layout.bytes_per_block()),
        "generated": {k: len(v) for k, v in out.items()},
        "rss": [{"stage": name, **usage} for name, usage in stages],
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def markdown(results: list[dict]) -> str:
    lines = ["| | " + " | ".join(r["dtype"] for r in results) + " |", "|---|" + "---|" * len(results)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")

    row("torch parameters", lambda r: _mib(r["torch_param_bytes"]))
    row("MLX weights (`weights_bytes`)", lambda r: f"{r['weights_bytes']:,} B ({_mib(r['weights_bytes'])})")
    row("KV bytes per block (16 tokens)", lambda r: f"{r['bytes_per_block']:,} B")
    for f in ("0.1", "auto"):
        row(f"blocks at `{f}`", lambda r, f=f: f"{r['plans'][f]['num_blocks']:,} "
            f"({r['plans'][f]['num_blocks'] * 16:,} tokens, KV {_mib(r['plans'][f]['kv_bytes'])})")
        row(f"headroom / total at `{f}`", lambda r, f=f: f"{_mib(r['plans'][f]['headroom_bytes'])} / "
            f"{_mib(r['plans'][f]['budget_bytes'])}")
    row("MLX peak above weights+cache in a step", lambda r: _mib(r["mlx_step_peak_above_steady"]))
    lines += ["", "| process RSS (current / peak) | " + " | ".join(r["dtype"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for i, stage in enumerate(results[0]["rss"]):
        name = stage["stage"].split(" (")[0] if "lowered" in stage["stage"] else stage["stage"]
        lines.append(f"| {name} | " + " | ".join(
            f"{_mib(r['rss'][i]['rss'])} / {_mib(r['rss'][i]['peak_rss'])}" for r in results) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.dtype:
        result = measure(args.dtype)
        print(json.dumps(result) if args.json else markdown([result]))
        return 0
    results = []
    for dtype in DTYPES:  # a fresh process each: peak RSS must not carry over
        out = subprocess.run([sys.executable, __file__, "--dtype", dtype, "--json"], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps(results) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
