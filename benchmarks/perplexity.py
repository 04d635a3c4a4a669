"""Perplexity of SmolLM2 on benchmarks/data/coriolanus.txt, llama-perplexity's way, for several systems.

    .venv/bin/python benchmarks/perplexity.py                         # every system, n_ctx 512
    .venv/bin/python benchmarks/perplexity.py --systems llamacpp,transformers-f32 --n-ctx 256

Systems (each gets the same token ids, windows and scoring: benchmarks/perplexity_procedure.py):
  transformers-f32  transformers, float32, on the bundled checkpoint (`weights.bundled.prepare`). That
                    checkpoint is the bundled Q4_1 GGUF dequantized, so this is the GGUF's own weights
                    in float32 arithmetic.
  ours-f32          the plugin's path without the engine (vLLM's torch model built under this platform,
                    captured, lowered, built; `ours`) on the same checkpoint, every window one prefill
                    step with logits at all positions.
  ours-q8           the same, the checkpoint's linear and embedding weights quantized at load to 8 bits,
                    group 64 (`VLLM_METAL_QUANTIZE=q8`).
  ours-q4           the same on the bundled GGUF itself (`smollm2-q4`): its Q4_1 tensors as 4-bit, group
                    32, and its Q8_0 embedding (the tied head too) as 8-bit, group 32, both exact.
  llamacpp          llama.cpp (llama-cpp-python, `logits_all=True`) on the bundled GGUF itself; it
                    runs in its own environment, made on first use (benchmarks/llamacpp.py).
The text is tokenized once with the checkpoint's tokenizer (the GGUF's, converted); the llama.cpp run
also reports whether its own tokenizer gives the same ids. Threads: all cores unless --threads
(torch and llama.cpp take the number; MLX's BLAS reads OPENBLAS_NUM_THREADS from the environment).
"""

from __future__ import annotations

import runtime  # noqa: F401  (optimized BLAS for MLX before mlx.core)

import argparse
import json
import os
import sys
import time

import mlx.core as mx
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import cpu_machine, log
from cpu_compiler import lowered_checkpoint
from llamacpp import bundled_gguf, gguf_adds_bos, run as run_llamacpp
from lowering.driver import Driver
from perplexity_procedure import DEFAULT_N_CTX, LogitsFn, load_text, perplexity
from runtime import kernels
from runtime.config import QuantizeSpec
from weights import bundled


def transformers_f32(model_dir: str, n_ctx: int) -> LogitsFn:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(window: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([window])).logits[0].float().numpy()
    return logits


def lowered_logits(lowered_model) -> LogitsFn:
    """Logits of every position of a window from a LoweredModel: one prefill step of a fresh sequence,
    logits_indices covering all its tokens, the sequence's cache blocks released after."""
    driver = Driver(lowered_model)

    def logits(window: list[int]) -> np.ndarray:
        driver.add(0, window)
        batch = driver.prepare({0: len(window)})
        batch.logits_indices = np.arange(len(window))
        out = lowered_model.step(batch)
        driver.release(0)
        return np.array(out.astype(mx.float32))
    return logits


def ours(model_dir: str, n_ctx: int, quantize: QuantizeSpec | None = None) -> LogitsFn:
    """The plugin's serving path without the engine (cpu_compiler.lowered_checkpoint)."""
    return lowered_logits(lowered_checkpoint(model_dir, n_ctx, quantize))


SYSTEMS = {
    "transformers-f32": transformers_f32,
    "ours-f32": lambda model_dir, n_ctx: ours(model_dir, n_ctx),
    "ours-q8": lambda model_dir, n_ctx: ours(model_dir, n_ctx, QuantizeSpec(8, 64)),
    "ours-q4": lambda model_dir, n_ctx: ours(bundled.resolve("smollm2-q4"), n_ctx),
}
ALL = [*SYSTEMS, "llamacpp"]


def measure(system: str, model_dir: str, tokens: list[int], text: str, n_ctx: int, add_bos: bool, bos: int,
            threads: int) -> dict:
    start = time.perf_counter()
    if system == "llamacpp":
        options = ["--n-ctx", str(n_ctx), "--threads", str(threads)] + (["--add-bos"] if add_bos else [])
        result = run_llamacpp("perplexity", bundled_gguf(), {"tokens": tokens, "text": text}, options)
    else:
        fn = SYSTEMS[system](model_dir, n_ctx)
        result = perplexity(fn, tokens, n_ctx, add_bos=add_bos, bos=bos,
                            progress=lambda i, p: log("ppl", f"{system} window {i + 1}: PPL so far {p:.4f}")).as_dict()
    result["wall_s"] = time.perf_counter() - start
    return result


def table(results: dict) -> str:
    """Markdown: each system's PPL, llama.cpp's +/-, and its distance from llama.cpp and transformers."""
    def vs(r, name):
        ref = results.get(name, {}).get("ppl")
        return f"{(r['ppl'] / ref - 1) * 100:+.3f}%" if ref else "n/a"
    lines = ["| system | PPL | +/- | vs llamacpp | vs transformers-f32 | windows x scored | s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ppl']:.4f} | {r['ppl_err']:.4f} | {vs(r, 'llamacpp')} | "
                     f"{vs(r, 'transformers-f32')} | {r['windows']} x {r['scored'] // r['windows']} = {r['scored']} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(ALL), help=f"comma-separated, from: {', '.join(ALL)}")
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in ALL]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    torch.set_num_threads(args.threads)

    model_dir = str(bundled.prepare("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = load_text()
    tokens = tokenizer.encode(text, add_special_tokens=False)
    add_bos = gguf_adds_bos(bundled_gguf())
    log("ppl", f"{len(tokens)} tokens, n_ctx {args.n_ctx}, add_bos {add_bos}, {args.threads} threads")

    kernel_table = kernels.current()
    report = {"machine": cpu_machine(), "kernels": kernel_table.name,
              "kernels_off": sorted(kernel_table.config.kernels_off),
              "text": "benchmarks/data/coriolanus.txt", "tokens": len(tokens),
              "n_ctx": args.n_ctx, "add_bos": add_bos, "threads": args.threads, "results": {}}
    for system in systems:
        log("ppl", f"{system} ...")
        r = report["results"][system] = measure(system, model_dir, tokens, text, args.n_ctx, add_bos,
                                                tokenizer.bos_token_id, args.threads)
        log("ppl", f"{system}: PPL {r['ppl']:.4f} +/- {r['ppl_err']:.4f}")
        if args.json:  # after every system: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    print(table(report["results"]), file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
