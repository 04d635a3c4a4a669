"""Section 1 (+ the lowering and host-overhead parts of section 4) for one dtype, in its own process.

Lowered SmolLM2 (vLLM's torch model -> capture -> passes -> MLX, driven by lowering.driver at batch 1)
against mlx-lm's hand-written model of the same checkpoint, same MLX build, same BLAS, same dtype,
same harness: prefill = one forward over the whole prompt (logits of the last token evaluated);
decode = N greedy steps after that prefill, each one forward + argmax + .item() (a host sync per
token in both). Repeats alternate ours / mlx-lm so that machine drift hits both alike.

    .venv/bin/python benchmarks/_compiler.py --dtype f32 --prompt 512 --gen 128 --repeats 3
"""

from __future__ import annotations

import runtime  # noqa: F401  (optimized BLAS for MLX before mlx.core)

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import summary  # noqa: E402

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to "
        "exchange salt, grain and cloth. Over the centuries it grew into a busy port with markets, "
        "bridges, schools and a library that drew scholars from distant lands. ")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


class Ours:
    """The lowered model through lowering.driver (batch 1, greedy)."""

    def __init__(self, path: str, dtype: str, max_len: int):
        from lowering.api import build_model, lower
        from lowering.capture import capture_vllm
        from lowering.vllm_build import build_vllm_model
        from lowering.driver import Driver

        t = time.perf_counter()
        model, config = build_vllm_model(path, dtype={"f32": "float32", "bf16": "bfloat16"}[dtype],
                                         max_model_len=max_len)
        self.build_s = time.perf_counter() - t
        program = capture_vllm(model, config)
        self.capture_s = program.meta["capture_s"]
        lowered = lower(program)
        self.passes_s, self.emit_s = lowered.timings["passes_s"], lowered.timings["emit_s"]
        t = time.perf_counter()
        blocks = (max_len + 15) // 16 + 2
        self.model = build_model(lowered, num_blocks=blocks, block_size=16, jit=True)
        self.weights_s = time.perf_counter() - t
        self.driver = Driver(self.model)
        del model, lowered, program
        self._seq = 0

    def prefill(self, prompt: list[int]):
        self._seq += 1
        self.driver.add(self._seq, prompt)
        row = self.driver.step({self._seq: len(prompt)})[self._seq]
        return self._seq, row

    def decode(self, seq_id, row, n: int) -> list[int]:
        import mlx.core as mx

        seq = self.driver.seqs[seq_id]
        out = []
        for _ in range(n):
            token = int(mx.argmax(row).item())
            out.append(token)
            seq.tokens.append(token)
            row = self.driver.step({seq_id: 1})[seq_id]
        return out

    def done(self, seq_id):
        self.driver.release(seq_id)


class MlxLm:
    def __init__(self, path: str, dtype: str):
        import mlx.core as mx
        from mlx_lm import load

        # mlx-lm 0.32.2 ignores transformers-5's nested rope_parameters: rope_theta 1e5 must be given.
        self.model, self.tokenizer = load(path, model_config={"rope_theta": 1e5})
        if dtype == "bf16":
            self.model.set_dtype(mx.bfloat16)
        else:
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())

    def prefill(self, prompt: list[int]):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array(prompt)[None], cache=cache)[0, -1]
        mx.eval(logits)
        return cache, logits

    def decode(self, cache, row, n: int) -> list[int]:
        import mlx.core as mx

        out = []
        for _ in range(n):
            token = int(mx.argmax(row).item())
            out.append(token)
            row = self.model(mx.array([[token]]), cache=cache)[0, -1]
            mx.eval(row)
        return out

    def done(self, cache):
        pass


def bench(impl, prompt, gen: int) -> tuple[float, float, list[int]]:
    t = time.perf_counter()
    handle, row = impl.prefill(prompt)
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    tokens = impl.decode(handle, row, gen)
    t_decode = time.perf_counter() - t
    impl.done(handle)
    return len(prompt) / t_prefill, gen / t_decode, tokens


def host_overhead(ours: Ours, prompt: list[int], steps: int = 48) -> dict:
    """Split decode steps of the lowered model into host parts and the MLX evaluation."""
    import mlx.core as mx
    import numpy as np

    from runtime.batch import attention_arrays, to_mlx

    drv, model = ours.driver, ours.model
    seq_id, row = ours.prefill(prompt)
    seq = drv.seqs[seq_id]
    parts = {"driver_build": [], "attention_arrays": [], "to_mlx": [], "call": [], "eval": [], "total": []}
    real_step = model.step

    def timed_step(batch):
        t0 = time.perf_counter()
        arrays = attention_arrays(batch, model.layout.block_size)
        t1 = time.perf_counter()
        arrays = to_mlx(arrays)
        ids = mx.array(batch.input_ids.astype(np.int32))
        pos = mx.array(batch.positions.astype(np.int32))
        li = mx.array(batch.logits_indices.astype(np.int32))
        t2 = time.perf_counter()
        logits, kv = model.step_fn(model.step_weights, model.kv, arrays, ids, pos, li)
        t3 = time.perf_counter()
        model.kv = kv
        mx.eval(logits, kv)
        t4 = time.perf_counter()
        parts["attention_arrays"].append(t1 - t0)
        parts["to_mlx"].append(t2 - t1)
        parts["call"].append(t3 - t2)
        parts["eval"].append(t4 - t3)
        timed_step.entered = t0
        return logits

    model.step = timed_step
    try:
        for _ in range(steps):
            token = int(mx.argmax(row).item())
            seq.tokens.append(token)
            t = time.perf_counter()
            row = drv.step({seq_id: 1})[seq_id]
            end = time.perf_counter()
            parts["total"].append(end - t)
            parts["driver_build"].append(timed_step.entered - t)
        # cProfile of a few untouched steps: where the host time goes (top functions by own time)
        model.step = real_step
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(8):
            token = int(mx.argmax(row).item())
            seq.tokens.append(token)
            row = drv.step({seq_id: 1})[seq_id]
        prof.disable()
    finally:
        model.step = real_step
        ours.done(seq_id)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(8)
    med = {k: float(np.median(v)) for k, v in parts.items()}
    host = med["driver_build"] + med["attention_arrays"] + med["to_mlx"] + med["call"]
    return {"median_s": med, "host_s": host, "host_pct": 100 * host / med["total"],
            "profile_top": buf.getvalue().splitlines()[:30]}


def lower_cached_times(path: str, dtype: str, max_len: int) -> dict:
    """lower_cached miss (into a fresh cache dir) then hit, as the plugin does it."""
    import tempfile

    from lowering.api import lower_cached
    from lowering.capture import capture_vllm
    from lowering.vllm_build import build_vllm_model

    os.environ["VLLM_METAL_CACHE"] = tempfile.mkdtemp(prefix="bench-lowered-")
    model, config = build_vllm_model(path, dtype={"f32": "float32", "bf16": "bfloat16"}[dtype], max_model_len=max_len)
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
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overheads", action="store_true", help="also host overhead + lowering cache timings")
    args = p.parse_args()

    import mlx.core as mx

    from runtime import blas
    from weights.bundled import prepare

    path = str(prepare("smollm2"))
    max_len = max(1024, 2 * (args.prompt + args.gen))
    ours = Ours(path, args.dtype, max_len)
    ref = MlxLm(path, args.dtype)
    prompt = prompt_tokens(ref.tokenizer, args.prompt)

    # warm-up: every shape both will see (the prompt length, decode at growing context)
    t = time.perf_counter()
    first_ours = bench(ours, prompt, min(args.gen, 16))
    ours_first_s = time.perf_counter() - t  # includes mx.compile tracing of the prefill and decode shapes
    bench(ref, prompt, min(args.gen, 16))

    runs = {"ours": {"prefill": [], "decode": []}, "mlx_lm": {"prefill": [], "decode": []}}
    tokens = {}
    ratios = {"prefill": [], "decode": []}
    for _ in range(args.repeats):
        pre_o, dec_o, tokens["ours"] = bench(ours, prompt, args.gen)
        pre_r, dec_r, tokens["mlx_lm"] = bench(ref, prompt, args.gen)
        runs["ours"]["prefill"].append(pre_o)
        runs["ours"]["decode"].append(dec_o)
        runs["mlx_lm"]["prefill"].append(pre_r)
        runs["mlx_lm"]["decode"].append(dec_r)
        ratios["prefill"].append(pre_o / pre_r)
        ratios["decode"].append(dec_o / dec_r)
    agree = 0
    for a, b in zip(tokens["ours"], tokens["mlx_lm"]):
        if a != b:
            break
        agree += 1

    weights = ours.model.weights
    total_bytes = sum(w.nbytes for w in weights.values())
    embed = [k for k in weights if "embed_tokens" in k]
    has_lm_head = any(k.startswith("lm_head") for k in weights)
    # per decode step every weight matrix is read once; the embedding table is read in full by the tied
    # lm_head (and only one row of it by the lookup): count it once.
    step_bytes = total_bytes if not has_lm_head else total_bytes - sum(weights[k].nbytes for k in embed)
    result = {
        "dtype": args.dtype, "prompt": args.prompt, "gen": args.gen, "repeats": args.repeats,
        "blas": blas.report() if hasattr(blas, "report") else None,
        "mlx": mx.__version__,
        "ours": {k: summary(v) for k, v in runs["ours"].items()},
        "mlx_lm": {k: summary(v) for k, v in runs["mlx_lm"].items()},
        "ratio": {k: summary(v) for k, v in ratios.items()},
        "greedy_agree": agree, "greedy_of": len(tokens["ours"]),
        "text_ours": ref.tokenizer.decode(tokens["ours"][:24]),
        "text_mlx_lm": ref.tokenizer.decode(tokens["mlx_lm"][:24]),
        "weights_bytes": total_bytes, "decode_step_weight_bytes": step_bytes, "weight_keys": len(weights),
        "lowering": {"build_vllm_model_s": ours.build_s, "capture_s": ours.capture_s, "passes_s": ours.passes_s,
                     "emit_s": ours.emit_s, "mlx_weights_s": ours.weights_s,
                     "first_run_s": ours_first_s},
    }
    if args.overheads:
        result["host"] = host_overhead(ours, prompt[:128])
        del ours, ref
        result["lower_cached"] = lower_cached_times(path, args.dtype, max_len)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
