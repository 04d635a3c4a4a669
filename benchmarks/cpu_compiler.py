"""Compiler quality on MLX's CPU backend: the lowered SmolLM2 against mlx-lm's hand-written model, one dtype.

Ours: vLLM's torch model -> capture_vllm -> passes -> compiled MLX, driven by lowering.driver at batch 1.
mlx-lm: its model of the same checkpoint. Same MLX build, BLAS, dtype and harness: prefill = one forward
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
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from common import summary
from lowering.api import build_model, lower
from lowering.capture import capture_vllm
from lowering.driver import Driver
from lowering.vllm_build import build_vllm_model
from runtime import blas
from weights.bundled import prepare

DTYPES = {"f32": "float32", "bf16": "bfloat16"}
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
        "exchange salt, grain and cloth. Over the centuries it grew into a busy port with markets, "
        "bridges, schools and a library that drew scholars from distant lands. ")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


class Ours:
    """The lowered model through lowering.driver (batch 1, greedy); `timings` of each lowering stage."""

    def __init__(self, path: str, dtype: str, max_len: int):
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
