"""torch on the GPU: the device's copy bandwidth (the decode ceiling) and the torch baselines.

Bandwidth: torch `copy_` of 1 GiB on the device, counted as read + write, median of 20. Baselines on the
same shapes, random weights drawn on the GPU: torch_eager (transformers' LlamaForCausalLM, SDPA,
DynamicCache) and torch_compile (decode mode="reduce-overhead", CUDA graphs, over a StaticCache; prefill the
default mode; dynamic=True, so one compile serves every batch size). torch runs ahead of the GPU by
construction and reads the tokens every step. A figure is the median over REPEATS segments of SEGMENT steps
after warm-up (tok/s = B x steps / s); a prefill row is the median of 9 batch-1 prompts.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, StaticCache

from common import ResultsFile, log, summary
from gpu_workloads import PROMPT, REPEATS, SEGMENT, WARMUP, load_config, prompts_for, torch_model

PREFILL_REPEATS = 9


def bandwidth(out) -> float:
    res = ResultsFile(out, "bandwidth", "torch copy")
    n = 1 << 30
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    gb_s = summary([2 * n / t / 1e9 for t in times])
    res.add(bytes=2 * n, GB_s=gb_s)
    log("torch", f"copy: {gb_s['median']:.0f} GB/s (best {gb_s['max']:.0f})")
    return gb_s["median"]


class TorchSystem:
    def __init__(self, model, compiled: bool, max_len: int):
        self.model, self.compiled, self.max_len = model, compiled, max_len
        self.name = "torch_compile" if compiled else "torch_eager"
        self._prefill, self._decode = self._prefill_fn, self._decode_fn
        if compiled:
            self._prefill = torch.compile(self._prefill_fn, dynamic=True)
            self._decode = torch.compile(self._decode_fn, mode="reduce-overhead", fullgraph=True, dynamic=True)

    def _prefill_fn(self, ids):
        return self.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]

    def _decode_fn(self, tok, pos, cache):
        return self.model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def prefill_last(self, prompt) -> None:
        self._prefill(torch.as_tensor(prompt, device="cuda")[None]).argmax(-1).tolist()

    @torch.no_grad()
    def start(self, prompts) -> dict:
        ids = torch.as_tensor(prompts, device="cuda")
        if self.compiled:  # static shapes for CUDA graphs: a StaticCache, prefilled eagerly
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            pos = torch.arange(ids.shape[1], device="cuda")
            out = self.model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)
        else:
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return {"cache": cache, "tok": out.logits[:, -1].argmax(-1), "pos": ids.shape[1]}

    @torch.no_grad()
    def decode(self, state: dict, steps: int) -> list[int]:
        for _ in range(steps):
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
                pos = torch.tensor([state["pos"]], device="cuda")
                logits = self._decode(state["tok"][:, None], pos, state["cache"])
            else:
                logits = self.model(input_ids=state["tok"][:, None], past_key_values=state["cache"],
                                    use_cache=True).logits[:, -1]
            state["tok"] = logits.argmax(-1)
            state["pos"] += 1
            host = state["tok"].tolist()
        return host


def measure(system: TorchSystem, res: ResultsFile, vocab: int, batches, prefills) -> None:
    for b in batches:
        try:
            state = system.start(prompts_for(vocab, b, PROMPT, seed=1000 + b))
            system.decode(state, WARMUP)
            times = []
            for _ in range(REPEATS):
                t = time.perf_counter()
                system.decode(state, SEGMENT)
                times.append(time.perf_counter() - t)
            res.add(kind="decode", batch=b, tok_s=summary([b * SEGMENT / x for x in times]),
                    step_ms=statistics.median(times) / SEGMENT * 1e3)
            log("torch", f"{system.name} decode b={b}: {statistics.median(times) / SEGMENT * 1e3:.2f} ms a step")
            del state
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001  one failure must not lose the rest
            res.error(f"{system.name} decode b={b}", exc)
    for n in prefills:
        try:
            prompt = prompts_for(vocab, 1, n, seed=n)[0]
            system.prefill_last(prompt)  # compiles / warms this shape
            times = []
            for _ in range(PREFILL_REPEATS):
                t = time.perf_counter()
                system.prefill_last(prompt)
                times.append(time.perf_counter() - t)
            res.add(kind="prefill", tokens=n, tok_s=summary([n / x for x in times]), ms=statistics.median(times) * 1e3)
            log("torch", f"{system.name} prefill {n}: {statistics.median(times) * 1e3:.2f} ms")
        except Exception as exc:  # noqa: BLE001
            res.error(f"{system.name} prefill {n}", exc)


def main(args) -> int:
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu.py {args.cmd}: torch {torch.__version__} sees no CUDA device")
    bandwidth(args.out)
    if args.cmd == "bandwidth":
        return 0
    deadline = time.perf_counter() + args.budget_s
    batches = [int(b) for b in args.batches.split(",") if b]
    prefills = [int(n) for n in args.prefills.split(",") if n]
    for name in args.models.split(","):
        cfg = load_config(name)
        model = torch_model(cfg, torch.bfloat16, "cuda", init="random", seed=1)
        torch.cuda.synchronize()
        for kind in args.systems.split(","):
            if kind == "compile" and time.perf_counter() > deadline:
                log("torch", f"{name} torch_compile skipped: the run's --budget-s is spent")
                continue
            system = TorchSystem(model, kind == "compile", max_len=256)
            measure(system, ResultsFile(args.out, "torch", f"{name} {system.name}"), cfg["vocab_size"], batches,
                    prefills)
        del model, system
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return 0
