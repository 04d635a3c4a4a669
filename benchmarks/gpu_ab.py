"""Speed on the GPU, paired: every side in ONE process on the same weights, in rounds.

Sides: ours (the first artefact folder), other lowerings (more folders, named by folder), ours with kernels
off (--variants, benchmarks/gpu_variants.py) and, with --mlx-lm, mlx-lm's model. In each round every side
runs every workload, in an order that rotates by round: a decode at each batch size (a synchronous segment
split into record / launch / wait, then a segment of the pipelined loop) and a prefill of each length
(median of 3). A host-bound step drifts by tens of percent between processes and even between minutes of
one process, so sides are compared round by round: the ratio of a workload is the median over rounds of
the per-round ratio.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import mlx.core as mx

from common import ResultsFile, log
from gpu_systems import Artefact, MlxLm, Ours, mlx_setup, part_name
from runtime.config import parse_quantize_spec
from gpu_variants import parse, variant_step
from gpu_workloads import BLOCK, PROMPT, SEGMENT, WARMUP, load_config, prompts_for


def step_split(record) -> tuple[object, dict]:
    """`record()` (lazy tokens, or a tuple starting with them), then `mx.async_eval` of the tokens, then their
    values on the host: what `record` returned and the three times in ms (record, launch, wait) and their sum."""
    t0 = time.perf_counter()
    out = record()
    t1 = time.perf_counter()
    tok = out[0] if isinstance(out, tuple) else out
    mx.async_eval(tok)
    t2 = time.perf_counter()
    tok.tolist()
    t3 = time.perf_counter()
    return out, {"record": (t1 - t0) * 1e3, "launch": (t2 - t1) * 1e3, "wait": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}


def medians(splits: list[dict]) -> dict:
    return {k: statistics.median(s[k] for s in splits) for k in splits[0]}


def decode_split(system, state: dict, steps: int) -> dict:
    """`steps` synchronous decode steps, each split into record (building it), launch (`mx.async_eval`
    returning) and wait (the token ids on the host); medians in ms."""
    splits = []
    for _ in range(steps):
        state["tok"], split = step_split(lambda: system.record_step(state))
        splits.append(split)
    return medians(splits)


def logits_agree(ours: Ours, ref: MlxLm, vocab: int) -> dict:
    """Same weights, one 64-token prompt: ours' and mlx-lm's last-token logits (catches a RoPE or config mismatch)."""
    prompt = prompts_for(vocab, 1, 64, seed=5)[0]
    sid = ours.add(prompt)
    a = ours.model.step(ours.driver.prepare({sid: len(prompt)}))[0].astype(mx.float32)
    ours.release(sid)
    b = ref.prompt_logits(prompt).astype(mx.float32)
    diff, scale = mx.abs(a - b).max().item(), mx.abs(b).max().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / scale,
            "argmax_equal": mx.argmax(a).item() == mx.argmax(b).item()}


def run_model(name: str, args, config) -> None:
    cfg = load_config(name)
    quantize = parse_quantize_spec(args.quantize, "--quantize")
    folders = [Path(f) for f in args.artefacts.split(",")]
    artefacts = [Artefact(f, name, quantize=quantize) for f in folders]
    batches = [int(b) for b in args.batches.split(",") if b]
    prefills = [int(n) for n in args.prefills.split(",") if n]
    weights = artefacts[0].random_weights(mx.bfloat16, seed=1)
    blocks = max(max(batches, default=1) * (256 // BLOCK), max(prefills, default=0) // BLOCK) + 64
    first = artefacts[0]
    sides = {"ours": Ours(first.source, first.layers, weights, mx.bfloat16, blocks)}
    for folder, a in zip(folders[1:], artefacts[1:]):
        sides[folder.name] = Ours(a.source, a.layers, weights, mx.bfloat16, blocks, name=folder.name)
    for v in parse(args.variants):
        sides[v] = Ours(first.source, first.layers, weights, mx.bfloat16, blocks, variant_step(first.source, v, config), v)
    res = ResultsFile(args.out, "ab", part_name(name, quantize), rounds=args.rounds, quantized=str(quantize or ""), sides=list(sides) + (["mlx_lm"] if args.mlx_lm else []),
                      decode_bytes_b1=first.decode_bytes(cfg.get("tie_word_embeddings", False),
                                                                PROMPT + WARMUP + 2 * SEGMENT + 2))
    if args.mlx_lm:
        sides["mlx_lm"] = MlxLm(cfg, weights, first.quantized)
        try:
            res.part["ours_vs_mlx_lm"] = logits_agree(sides["ours"], sides["mlx_lm"], cfg["vocab_size"])
            log("ab", f"{name}: ours vs mlx-lm logits, same weights: {res.part['ours_vs_mlx_lm']}")
        except Exception as exc:  # noqa: BLE001  the speed rows still count
            res.error(f"{name} ours vs mlx-lm logits", exc)
    labels = list(sides)
    for r in range(args.rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for b in batches:
            for label in order:
                system = sides[label]
                state = system.start(prompts_for(cfg["vocab_size"], b, PROMPT, seed=1000 + b))
                system.decode(state, WARMUP, pipelined=False)
                split = decode_split(system, state, SEGMENT)
                system.decode(state, 2, pipelined=True)  # the pipelined loop's own first steps
                t = time.perf_counter()
                system.decode(state, SEGMENT, pipelined=True)
                async_ms = (time.perf_counter() - t) / SEGMENT * 1e3
                system.finish(state)
                sync_ms = split.pop("total")
                res.add(side=label, round=r, kind="decode", batch=b, sync_ms=sync_ms, async_ms=async_ms, **split)
                log("ab", f"{name} round {r} b={b} {label}: sync {sync_ms:.2f} ms (record {split['record']:.2f}, "
                    f"launch {split['launch']:.2f}), async {async_ms:.2f} ms")
        for n in prefills:
            prompt = prompts_for(cfg["vocab_size"], 1, n, seed=n)[0]
            for label in order:
                sides[label].prefill_last(prompt)  # this shape traced and warm
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    sides[label].prefill_last(prompt)
                    times.append((time.perf_counter() - t) * 1e3)
                res.add(side=label, round=r, kind="prefill", tokens=n, ms=statistics.median(times))
                log("ab", f"{name} round {r} prefill {n} {label}: {statistics.median(times):.2f} ms")
    del sides, weights
    mx.clear_cache()


def main(args) -> int:
    config = mlx_setup(args.device)
    for name in args.models.split(","):
        run_model(name, args, config)
    return 0
