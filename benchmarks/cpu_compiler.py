"""Compiler quality on MLX's CPU backend: the lowered SmolLM2 against mlx-lm's hand-written model, one dtype.

Ours: vLLM's torch model -> capture_vllm -> passes -> compiled MLX, driven by lowering.driver at batch 1.
mlx-lm: its model of the same checkpoint. `--dtype q4`: ours serves the bundled GGUF (`smollm2-q4`: Q4_1
linears as 4-bit groups of 32, the Q8_0 embedding and tied head as 8-bit), float32 activations; mlx-lm
quantizes the dequantized checkpoint with `nn.quantize` (4-bit, groups of 32, the embedding too). Same MLX build, BLAS, dtype and harness: prefill = one forward
over the whole prompt (the last token's logits evaluated); decode = N greedy steps after it, each one
forward + argmax + .item() (a host sync per token in both). Repeats alternate ours and mlx-lm so that
machine drift hits both alike; a ratio is taken per repeat. Prints one JSON line.

    .venv/bin/python benchmarks/cpu_compiler.py --dtype f32 --prompt 512 --gen 128 --repeats 3
"""

from __future__ import annotations

import runtime  # noqa: F401  (first: the optimized BLAS for MLX's CPU backend before mlx.core)

import argparse
import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from common import summary
from lowering.api import build_model, lower, lower_cached
from lowering.capture import capture_vllm
from lowering.compile import load_step
from lowering.driver import Driver
from lowering.vllm_build import build_vllm_model
from runtime import blas
from runtime.config import QuantizeSpec
from runtime.model import CacheLayout, LoweredModel
from vllm_metal_plugin.checkpoints import checkpoint_sources
from weights.bundled import prepare, resolve

DTYPES = {"f32": "float32", "bf16": "bfloat16", "q4": "float32"}  # q4: the bundled GGUF, float32 activations
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
        "exchange salt, grain and cloth. Over the centuries it grew into a busy port with markets, "
        "bridges, schools and a library that drew scholars from distant lands. ")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def lowered_checkpoint(model_dir: str, max_len: int, quantize: QuantizeSpec | None = None) -> LoweredModel:
    """The plugin's serving path without the engine, float32: vLLM's torch model built under this platform, a
    quantized checkpoint's weights loaded into MLX by their parameter paths (or the model's own weights
    quantized at load with `quantize`), captured, lowered (lower_cached), built."""
    model, config = build_vllm_model(model_dir, dtype="float32", max_model_len=max_len)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    sources, fmt = checkpoint_sources(model, model_dir)
    identity = {"harness": "benchmarks", "front": "vllm", "model": model_dir, "dtype": "float32",
                "hf_config": config.model_config.hf_config.to_json_string(use_diff=False),
                "weights": fmt or "full precision", "quantize": str(quantize)}
    source, weights, layers, _ = lower_cached(identity, lambda: capture_vllm(model, config), state,
                                              sources=sources, quantize=quantize)
    if (sources or quantize) and "k.quantized_linear(" not in source:
        raise RuntimeError(f"{model_dir}: the lowered step has no quantized linear; the run would not be quantized")
    layout = CacheLayout(len(layers), layers[0].num_kv_heads, layers[0].head_dim, 16, mx.float32)
    return LoweredModel(load_step(source), weights, layout, num_blocks=(max_len + 15) // 16 + 2)


class Ours:
    """The lowered model through lowering.driver (batch 1, greedy); `timings` of each lowering stage."""

    def __init__(self, path: str, dtype: str, max_len: int):
        if dtype == "q4":
            t = time.perf_counter()
            self.model = lowered_checkpoint(str(resolve("smollm2-q4")), max_len)
            self.timings = {"lowered_checkpoint_s": time.perf_counter() - t}
            self.driver, self._seq = Driver(self.model), 0
            return
        t = time.perf_counter()
        model, config = build_vllm_model(path, dtype=DTYPES[dtype], max_model_len=max_len)
        self.timings = {"build_vllm_model_s": time.perf_counter() - t}
        program = capture_vllm(model, config)
        lowered = lower(program)
        self.timings.update(capture_s=program.meta["capture_s"], passes_s=lowered.timings["passes_s"],
                            emit_s=lowered.timings["emit_s"])
        t = time.perf_counter()
        self.model = build_model(lowered, num_blocks=(max_len + 15) // 16 + 2, block_size=16, jit=True)
        self.timings["mlx_weights_s"] = time.perf_counter() - t
        self.driver = Driver(self.model)
        self._seq = 0

    def prefill(self, prompt: list[int]):
        self._seq += 1
        self.driver.add(self._seq, prompt)
        return self._seq, self.driver.step({self._seq: len(prompt)})[self._seq]

    def decode(self, seq_id, row, n: int) -> list[int]:
        seq, out = self.driver.seqs[seq_id], []
        for _ in range(n):
            out.append(int(mx.argmax(row).item()))
            seq.tokens.append(out[-1])
            row = self.driver.step({seq_id: 1})[seq_id]
        return out

    def done(self, seq_id) -> None:
        self.driver.release(seq_id)


class MlxLm:
    def __init__(self, path: str, dtype: str):
        # mlx-lm 0.32.2 ignores transformers-5's nested rope_parameters: rope_theta 1e5 must be given
        self.model, self.tokenizer = load(path, model_config={"rope_theta": 1e5})
        self.model.set_dtype(mx.bfloat16 if dtype == "bf16" else mx.float32)
        if dtype == "q4":
            nn.quantize(self.model, group_size=32, bits=4)
        mx.eval(self.model.parameters())

    def prefill(self, prompt: list[int]):
        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array(prompt)[None], cache=cache)[0, -1]
        mx.eval(logits)
        return cache, logits

    def decode(self, cache, row, n: int) -> list[int]:
        out = []
        for _ in range(n):
            out.append(int(mx.argmax(row).item()))
            row = self.model(mx.array([[out[-1]]]), cache=cache)[0, -1]
            mx.eval(row)
        return out

    def done(self, cache) -> None:
        pass


def bench(impl, prompt, gen: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, the greedy tokens)."""
    t = time.perf_counter()
    handle, row = impl.prefill(prompt)
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    tokens = impl.decode(handle, row, gen)
    t_decode = time.perf_counter() - t
    impl.done(handle)
    return len(prompt) / t_prefill, gen / t_decode, tokens


def decode_step_bytes(weights: dict) -> int:
    """Bytes a batch-1 decode step reads: every weight matrix once; a tied embedding table is read in full by
    the LM head (and one row of it by the lookup): counted once."""
    total = sum(w.nbytes for w in weights.values())
    if any(k.startswith("lm_head") for k in weights):
        total -= sum(w.nbytes for k, w in weights.items() if "embed_tokens" in k)
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="f32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    path = str(prepare("smollm2"))
    ours = Ours(path, args.dtype, max(1024, 2 * (args.prompt + args.gen)))
    ref = MlxLm(path, args.dtype)
    prompt = prompt_tokens(ref.tokenizer, args.prompt)
    for impl in (ours, ref):  # warm-up: every shape both will see (the prompt, decode at growing context)
        bench(impl, prompt, min(args.gen, 16))

    runs = {side: {"prefill": [], "decode": []} for side in ("ours", "mlx_lm")}
    ratios = {"prefill": [], "decode": []}
    tokens = {}
    for _ in range(args.repeats):
        for side, impl in (("ours", ours), ("mlx_lm", ref)):
            pre, dec, tokens[side] = bench(impl, prompt, args.gen)
            runs[side]["prefill"].append(pre)
            runs[side]["decode"].append(dec)
        for k in ratios:
            ratios[k].append(runs["ours"][k][-1] / runs["mlx_lm"][k][-1])
    agree = next((i for i, (a, b) in enumerate(zip(tokens["ours"], tokens["mlx_lm"])) if a != b), len(tokens["ours"]))
    weights = ours.model.weights
    print(json.dumps({
        "dtype": args.dtype, "prompt": args.prompt, "gen": args.gen, "repeats": args.repeats,
        "blas": blas.report(), "mlx": mx.__version__,
        "ours": {k: summary(v) for k, v in runs["ours"].items()},
        "mlx_lm": {k: summary(v) for k, v in runs["mlx_lm"].items()},
        "ratio": {k: summary(v) for k, v in ratios.items()},
        "greedy_agree": agree, "greedy_of": len(tokens["ours"]),
        "text_ours": ref.tokenizer.decode(tokens["ours"][:24]), "text_mlx_lm": ref.tokenizer.decode(tokens["mlx_lm"][:24]),
        "weights_bytes": sum(w.nbytes for w in weights.values()), "decode_step_weight_bytes": decode_step_bytes(weights),
    }, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
