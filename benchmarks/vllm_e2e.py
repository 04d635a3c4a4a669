"""End to end in vLLM (`LLM.generate`, offline) for one engine configuration, in its own process (an engine
needs a fresh one). Prints one JSON line.

    .venv/bin/python benchmarks/vllm_e2e.py --mode mlx|torch|cpu --concurrency 1,8,32 --repeats 2

mode mlx: this plugin (lowered, compiled MLX); torch: the same plugin with VLLM_METAL_USE_MLX=0 (vLLM's
torch model, eager); cpu: vLLM's built-in CPU platform (VLLM_PLUGINS=none, eager, KV space 2 GiB, no
reserved core). The parent (benchmarks/run.py) sets that environment; this file only drives `LLM.generate`.
Prompts are distinct random token ids (no prefix-cache hits), greedy, ignore_eos, fixed lengths. Throughput
= output tokens / wall time of a `generate` call; TTFT = median over requests of first_token_latency; TPOT =
median over requests of (last - first token time) / (tokens - 1).
"""

from __future__ import annotations

import runtime  # noqa: F401  (first: the optimized BLAS for MLX's CPU backend before mlx.core)

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="bench-rpc-"))  # before vLLM reads them
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="bench-vllm-cache-"))

import numpy as np  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from weights.bundled import prepare  # noqa: E402


def generate(llm, prompts: list, gen: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, tpot = [], []
    for m in (o.metrics for o in outs if o.metrics is not None):
        if getattr(m, "first_token_latency", 0):
            ttft.append(m.first_token_latency)
        k = getattr(m, "num_generation_tokens", 0)
        if k > 1 and m.last_token_ts > m.first_token_ts:
            tpot.append((m.last_token_ts - m.first_token_ts) / (k - 1))
    return {"tok_s": produced / wall, "wall_s": wall, "produced": produced,
            "ttft_s": statistics.median(ttft) if ttft else None, "tpot_s": statistics.median(tpot) if tpot else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["mlx", "torch", "cpu"], required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-gen", type=int, default=8)
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    kwargs = dict(model=str(prepare("smollm2")), dtype=args.dtype, max_model_len=2 * (args.prompt + args.gen),
                  max_num_seqs=max(levels), disable_log_stats=False, enable_prefix_caching=False)
    if args.mode == "cpu":
        kwargs["enforce_eager"] = True
    t = time.perf_counter()
    llm = LLM(**kwargs)
    start_s = time.perf_counter() - t

    rng = np.random.default_rng(0)

    def prompts(n):
        return [TokensPrompt(prompt_token_ids=rng.integers(100, 40000, args.prompt).tolist()) for _ in range(n)]

    results = {}
    for n in levels:
        generate(llm, prompts(n), args.warmup_gen)  # warm-up: every step shape of this level
        results[str(n)] = [generate(llm, prompts(n), args.gen) for _ in range(args.repeats)]
    text = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8),
                        use_tqdm=False)[0].outputs[0].text
    print(json.dumps({"mode": args.mode, "dtype": args.dtype, "start_s": start_s, "levels": results,
                      "sample_text": text}))
    sys.stdout.flush()
    del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
