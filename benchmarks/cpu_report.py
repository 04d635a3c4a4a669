"""The CPU section of docs/benchmarks.md from a run's results (benchmarks/run.py): tables with this run's
numbers, and what explains them. The explanations are static text checked against profiles of the current
code; edit them when the causes change.
"""

from __future__ import annotations

from common import fmt, summary

E2E_MODES = {
    "mlx": ("plugin, MLX (lowered)", {"VLLM_METAL_USE_MLX": "1"}),
    "cpu": ("vLLM built-in CPU platform (eager)",
            {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
}
COMPILER_DTYPES = ("f32", "bf16", "q4")
PROFILE_DTYPES = ("f32", "q4")  # cpu_profile.py: where the step's CPU time goes
DTYPE_NAMES = {"f32": "float32", "bf16": "bfloat16"}
HOST_PARTS = (("prepare", "lowering.driver: the StepInput of the sequence (numpy)"),
              ("step_args", "the step's arrays: attention and cache-row indices (numpy), one host-to-device array"),
              ("call", "calling the `mx.compile`d step (graph replay, host only)"),
              ("eval", "`mx.eval` (the math, on 2 cores)"))

# what limits a goal while it is missed
LIMITS = {
    "ceiling": "the f32 products run near the copy bandwidth but are only about half of the step's CPU time (profile "
               "below); the other half is MLX's graph evaluation and allocation, thread hand-offs (the OS and our "
               "pool's waits between ~150 threaded kernels a step) and attention, while ~200 small MLX ops run one "
               "at a time on one thread",
    "e2e": "at one request the step's small MLX ops run one at a time on one thread, where torch's eager CPU "
           "ops are cheaper each; the batched steps amortise them",
    "host": "replaying the compiled graph (~1,500 nodes) costs ~4 ms a step, paid in full by the synchronous "
            "loop that vLLM's sampler needs (logits on the host every step)",
    "llamacpp": "llama.cpp quantizes the activations to 8 bits and multiplies integer codes (one instruction per "
                "32 products), where ours converts every 4-bit code to float",
    "builtin1": "the 4-bit and 8-bit products (~40% of the step's CPU time, profile below) are compute-bound at "
                "~8 GB/s a core (a mask, a conversion and an FMA per 8 codes, exact float32); the rest of the step "
                "(MLX's graph evaluation and allocation, thread hand-offs, attention: ~55%) is what f32 pays too, "
                "so the 4-bit step is ~2x faster than f32, not the 4x over the built-in platform the goal needs",
    "bf16": "a bf16 weight costs a widening to f32 per product; at M = 1 the GEMV runs near the bandwidth of "
            "half the bytes, but the step's other work is the same",
}


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def _tok(e2e: dict, mode: str, level, key: str = "tok_s", scale: float = 1.0) -> dict | None:
    try:
        values = [scale * r[key] for r in e2e[mode]["levels"][str(level)] if r[key] is not None]
    except KeyError:
        return None
    return summary(values) if values else None


def _quiet_line(loads: list[dict]) -> str:
    return ("- **Quiet check:** the machine is shared; before each part the run waits (up to 2 min) until under 0.5 "
            "cores are busy over 3 s. Cores busy when each part started (1-min load average): " + ", ".join(
                f"{x['section']}: {x['busy_start']} ({x['load_start']})"
                + (f", waited {x['waited_s']:.0f} s" if x["waited_s"] > 5 else "") for x in loads))


def _compilers(res: dict) -> list[dict]:
    return [res[f"compiler_{d}"] for d in COMPILER_DTYPES if res.get(f"compiler_{d}")]


def goals(res: dict, ceiling: float) -> list[str]:
    c32, c16, q4 = (res.get(f"compiler_{d}") for d in COMPILER_DTYPES)
    e2e, lcpp, host = res.get("e2e") or {}, res.get("llamacpp"), res["overheads"]["host"]
    dec = lambda c: c["ours"]["decode"]["median"]  # noqa: E731
    pct = 100 * dec(c32) / ceiling
    rows = [(f"decode >= 1.0x mlx-lm ({c['dtype']})", f"{fmt(c['ratio']['decode'], 2)}x", c["ratio"]["decode"]["median"] >= 1, "")
            for c in _compilers(res)]
    rows += [(f"prefill >= 1.0x mlx-lm ({c['dtype']})", f"{fmt(c['ratio']['prefill'], 2)}x", c["ratio"]["prefill"]["median"] >= 1, "")
             for c in _compilers(res)]
    rows.append(("decode at batch 1 >= 60% of the bandwidth ceiling (f32)",
                 f"{pct:.0f}% ({dec(c32):.1f} of {ceiling:.1f} tok/s)", pct >= 60, LIMITS["ceiling"]))
    if c16:
        rows.append(("bf16 decode faster than f32", f"{dec(c16):.1f} vs {dec(c32):.1f} tok/s", dec(c16) > dec(c32), LIMITS["bf16"]))
    if q4 and lcpp:
        ref = lcpp["decode_tok_s"]["median"]
        rows.append(("4-bit decode at batch 1 >= llama.cpp on the same GGUF, same threads",
                     f"{dec(q4) / ref:.2f}x ({dec(q4):.1f} vs {ref:.1f} tok/s)", dec(q4) >= ref, LIMITS["llamacpp"]))
    builtin1 = max((t["median"] for dt in e2e if (t := _tok(e2e[dt], "cpu", 1))), default=None)
    if q4 and builtin1:
        rows.append(("4-bit decode at batch 1 >= 4x vLLM's built-in CPU platform at 1 request (its faster of f32, bf16)",
                     f"{dec(q4) / builtin1:.2f}x ({dec(q4):.1f} vs {builtin1:.1f} tok/s)", dec(q4) >= 4 * builtin1,
                     LIMITS["builtin1"]))
    for dt in e2e:
        for n in (8, 32):
            plugin, builtin = _tok(e2e[dt], "mlx", n), _tok(e2e[dt], "cpu", n)
            r = plugin["median"] / builtin["median"] if plugin and builtin else None
            rows.append((f"plugin >= 1.0x the built-in CPU platform at {n} requests ({dt})",
                         f"{r:.2f}x ({plugin['median']:.1f} vs {builtin['median']:.1f} tok/s)" if r else "not run",
                         None if r is None else r >= 1, LIMITS["e2e"]))
    rows.append(("host time < 5% of a batch-1 decode step",
                 f"{host['host_pct']:.1f}% ({1e3 * host['host_s']:.1f} of {1e3 * host['median_s']['total']:.0f} ms)",
                 host["host_pct"] < 5, LIMITS["host"]))
    return ["| goal | now | status | what limits it |", "|---|---|---|---|",
            *(f"| {g} | {now} | {_status(ok)} | {(limit or 'not analysed for this run') if ok is False else ''} |"
              for g, now, ok, limit in rows)]


def render(res: dict, results_path) -> str:
    m, p = res["machine"], res["plan"]
    c32, bw = res["compiler_f32"], res["bandwidth"]["gb_s"]
    over, e2e, lcpp = res["overheads"], res.get("e2e") or {}, res.get("llamacpp")
    ceiling = bw["median"] * 1e9 / c32["decode_step_weight_bytes"]
    L = [f"Written by `benchmarks/run.py` from its results, `{results_path}`. Model: SmolLM2-135M-Instruct (bundled, "
         "134.5M parameters, 30 layers, tied embeddings), on MLX's CPU backend with this project's CPU kernels "
         "(docs/cpu-kernels.md).", "",
         f"- **Machine:** {m['cores']} cores, `{m['cpu']}`, {m['mem_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}",
         f"- **Date:** {res['date']}; **command:** `{res['command']}` ({res.get('total_s', float('nan')) / 60:.0f} min"
         + "".join(f"; its missing parts measured {r['date']} by `{r['command']}`" for r in res.get("resumed", [])) + ")",
         f"- **BLAS used by MLX:** `{(c32.get('blas') or {}).get('sgemm_library')}`, MLX {c32.get('mlx')}",
         "- **Statistic:** median (min-max) over repeats after a warm-up; ours / mlx-lm ratios are per repeat inside one "
         "process (the two interleaved), then summarised.",
         _quiet_line(res["loads"]), *([f"- **Not measured:** {res['stopped']}."] if res.get("stopped") else []),
         "", "### Goals", "", *goals(res, ceiling), ""]

    L += ["### The lowered model against mlx-lm and llama.cpp", "",
          "Same weights and harness: batch 1, greedy, one forward + argmax + `.item()` a token. Ours: vLLM's "
          "torch model -> `capture_vllm` -> passes -> compiled MLX, driven by `lowering.driver`; mlx-lm 0.32.2: "
          "`mlx_lm.load(path, model_config={'rope_theta': 1e5})` (`benchmarks/cpu_compiler.py`). q4: ours serves the "
          "bundled GGUF (Q4_1 linears as 4-bit groups of 32, the Q8_0 embedding and tied head as 8-bit) with f32 "
          "activations; mlx-lm quantizes the same weights with `nn.quantize` (4-bit, groups of 32, the head too).", "",
          "| dtype | prompt / new tokens | repeats | prefill ours tok/s | mlx-lm | **ratio** | decode ours tok/s | "
          "mlx-lm | **ratio** | greedy tokens equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in _compilers(res):
        L.append(f"| {c['dtype']} | {c['prompt']} / {c['gen']} | {c['repeats']} | {fmt(c['ours']['prefill'])} | "
                 f"{fmt(c['mlx_lm']['prefill'])} | **{fmt(c['ratio']['prefill'], 2)}x** | {fmt(c['ours']['decode'], 2)} | "
                 f"{fmt(c['mlx_lm']['decode'], 2)} | **{fmt(c['ratio']['decode'], 2)}x** | {c['greedy_agree']}/{c['greedy_of']} |")
    if lcpp:
        L += ["", f"llama.cpp (llama-cpp-python {lcpp.get('llama_cpp_python')}, `{lcpp.get('gguf')}`, "
              f"{lcpp.get('threads', 2)} threads, `benchmarks/llamacpp.py`), same prompt: prefill "
              f"{fmt(lcpp['prefill_tok_s'])} tok/s, decode {fmt(lcpp['decode_tok_s'], 2)} tok/s."]
    same = c32["text_ours"] == c32["text_mlx_lm"]
    L += ["", "Greedy f32 text, " + (f"both: `{c32['text_ours']!r}`." if same else
                                     f"ours: `{c32['text_ours']!r}`; mlx-lm: `{c32['text_mlx_lm']!r}`."), ""]

    e = p["e2e"]
    L += ["### End to end in vLLM 0.32 (`LLM.generate`, offline)", "",
          f"Prompts of 128 distinct random tokens, {e['gen']} new tokens each, greedy, `ignore_eos`, prefix "
          f"caching off, `max_num_seqs={max(int(n) for n in e['levels'].split(','))}`; {e['repeats']} "
          f"repeat{'s' if e['repeats'] != 1 else ''} a level after a warm-up generate (8 new tokens) at that level; one "
          "engine process per configuration (`benchmarks/vllm_e2e.py`). TTFT includes queueing behind the other "
          "prompts' prefill. The built-in CPU platform runs in its default configuration.", ""]
    if e2e:
        levels = e["levels"].split(",")
        L += ["| dtype | configuration | engine start s | " + " | ".join(f"tok/s @{n}" for n in levels) + " | "
              + " | ".join(f"TTFT s @{n}" for n in levels) + " | " + " | ".join(f"TPOT ms @{n}" for n in levels) + " |",
              "|---|---|---|" + "---|" * (3 * len(levels))]
        for dt, runs in e2e.items():
            for mode, (label, _) in E2E_MODES.items():
                if mode in runs:
                    cells = [fmt(_tok(runs, mode, n)) for n in levels] + [fmt(_tok(runs, mode, n, "ttft_s"), 2) for n in levels]
                    cells += [fmt(_tok(runs, mode, n, "tpot_s", 1e3), 0) for n in levels]
                    L.append(f"| {dt} | {label} | {runs[mode]['start_s']:.0f} | " + " | ".join(cells) + " |")
        ratios = [f"{dt} @{n}: {_tok(r, 'mlx', n)['median'] / _tok(r, 'cpu', n)['median']:.2f}x" for dt, r in e2e.items()
                  for n in levels if _tok(r, "mlx", n) and _tok(r, "cpu", n)]
        texts = {f"{dt} {k}": r.get("sample_text") for dt, runs in e2e.items() for k, r in runs.items()}
        sample = (f"All answer 'The capital of France is' with `{next(iter(texts.values()))!r}`."
                  if len(set(texts.values())) == 1 else
                  "Answers to 'The capital of France is': " + "; ".join(f"{k}: `{t!r}`" for k, t in texts.items()) + ".")
        L += ["", "Plugin / built-in CPU platform (ratio of medians, processes run one after the other): "
              + ", ".join(ratios) + ". " + sample, ""]
    else:
        L += ["(not run: --skip-e2e)", ""]

    L += ["### The limit: memory bandwidth", "",
          f"torch `copy_` of a 1 GiB float32 buffer on 2 threads, read + write: **{fmt(bw)} GB/s** ({bw['n']} repeats"
          + (f"; {res['bandwidth']['note']}" if res["bandwidth"].get("note") else "") + "). "
          "A batch-1 decode step reads every weight once (the tied embedding once, as the LM head); K/V reads at "
          "these lengths are < 1%.", "",
          "| dtype | weights read a step | ceiling tok/s | ours tok/s | % | mlx-lm tok/s | % |", "|---|---|---|---|---|---|---|"]
    for c in _compilers(res):
        ceil = bw["median"] * 1e9 / c["decode_step_weight_bytes"]
        ours, ref = c["ours"]["decode"]["median"], c["mlx_lm"]["decode"]["median"]
        L.append(f"| {c['dtype']} | {c['decode_step_weight_bytes'] / 1e6:.1f} MB | {ceil:.1f} | {ours:.2f} | "
                 f"{100 * ours / ceil:.0f}% | {ref:.2f} | {100 * ref / ceil:.0f}% |")

    lo, lc, host = over["lowering"], over["lower_cached"], over["host"]
    ms = {k: 1e3 * v for k, v in host["median_s"].items()}
    L += ["", "### Overheads", "", "Lowering SmolLM2 f32 once, in a fresh process (`benchmarks/cpu_overheads.py`):", "",
          "| stage | s |", "|---|---|",
          f"| build vLLM's torch model and load its weights (not lowering) | {lo['build_vllm_model_s']:.1f} |",
          f"| capture (`torch.export` of the whole step) | {lo['capture_s']:.1f} |",
          f"| passes | {lo['passes_s']:.2f} |", f"| emit MLX source | {lo['emit_s']:.2f} |",
          f"| weights -> MLX, KV cache | {lo['mlx_weights_s']:.2f} |",
          f"| first prefill + 16 decode steps (`mx.compile` traces each new shape) | {lo['first_run_s']:.1f} |",
          f"| `lower_cached` miss (capture + passes + emit + store), as the plugin calls it | {lc['miss']['s']:.1f} |",
          f"| `lower_cached` hit (load the verified artefact, weights -> MLX) | {lc['hit']['s']:.2f} |", "",
          "Host time of a batch-1 decode step (f32, context 129-176 tokens, medians of 48 steps):", "",
          "| part | ms | % of step |", "|---|---|---|",
          *(f"| {label} | {ms[k]:.2f} | {100 * ms[k] / ms['total']:.1f}% |" for k, label in HOST_PARTS),
          f"| **whole step** | {ms['total']:.1f} | host {host['host_pct']:.1f}% |", ""]
    return "\n".join(L + profile(res) + why(res, ceiling))


def profile(res: dict) -> list[str]:
    """Where a batch-1 decode step's CPU time goes (cpu_profile.py), a column per profiled dtype."""
    runs = {dt: res[f"profile_{dt}"] for dt in PROFILE_DTYPES if res.get(f"profile_{dt}")}
    if not runs:
        return []
    groups = sorted({g for r in runs.values() for g in r["cpu_time_share_percent"]},
                    key=lambda g: -max(r["cpu_time_share_percent"].get(g, 0.0) for r in runs.values()))
    first = next(iter(runs.values()))
    return ["### Where a decode step's CPU time goes", "",
            f"`perf record` of batch-1 decoding after a {first['prompt']}-token prompt, {first['seconds']:.0f} s a dtype, "
            "every thread of the process (`benchmarks/cpu_profile.py`); shares of CPU time over both cores, samples "
            "grouped by what ran.", "",
            "| what ran | " + " | ".join(f"{dt} (% of CPU time)" for dt in runs) + " |",
            "|---|" + "---|" * len(runs),
            *(f"| {g} | " + " | ".join(f"{r['cpu_time_share_percent'].get(g, 0.0):.1f}" for r in runs.values()) + " |"
              for g in groups),
            "| step under `perf` (ms) | " + " | ".join(f"{r['ms_per_step']:.1f}" for r in runs.values()) + " |", ""]


def why(res: dict, ceiling: float) -> list[str]:
    """What explains the numbers (static text; this run's numbers in the headings)."""
    c32 = res["compiler_f32"]
    busy = [x.get("busy_start", x["load_start"]) for x in res.get("loads", [])]
    P = ["### Why", ""]
    if busy and max(busy) > 1.0:
        P += [f"**Noise.** Up to {max(busy):.1f} cores were busy when a part started: absolute tok/s are lower than on "
              "a quiet machine; the interleaved ours / mlx-lm ratios hold up better, and the min-max spread shows by how "
              "much each moved.", ""]
    P += ["**Matrix products.** Every linear of a decode step runs in this project's compiled kernels "
          "(`runtime/kernels/cpu_ext.py`, C++ in `csrc/`): a GEMV per weight layout (f32, bf16/f16 widened to f32, "
          "4/8-bit codes dequantized in registers) threaded over output columns on one pool. mlx-lm runs MLX's own "
          "CPU paths: OpenBLAS's sgemm for f32 (slower than a GEMV at M = 1), a scalar loop for bf16 and for "
          "quantized weights, which is why the bf16 and 4-bit ratios are the largest.", "",
          "**Attention and the rest.** Decode attention reads the paged cache in place in a compiled kernel "
          "(online softmax, vectorised exp, threaded over sequences and KV heads; docs/cpu-kernels.md); prefill "
          "computes the softmax's exp from a polynomial and the exponent bits (`fastmath`), where MLX's CPU `exp` "
          "costs 35-50 ns an element. The remaining ~200 small MLX ops of a step (norms, RoPE, reshapes) run one "
          "at a time on one thread.", "",
          f"**Bandwidth ceiling ({100 * c32['ours']['decode']['median'] / ceiling:.0f}% of {ceiling:.0f} tok/s in f32).** "
          f"{c32['decode_step_weight_bytes'] / 1e6:.0f} MB of weights at the measured bandwidth take "
          f"{1e3 / ceiling:.0f} ms; our step takes {1e3 / c32['ours']['decode']['median']:.0f} ms at 512-640 tokens of "
          "context: the products are near the bandwidth (docs/cpu-kernels.md), the rest of the step is not.", ""]
    if res.get("e2e"):
        P += ["**vLLM end to end.** The built-in CPU platform runs torch with oneDNN GEMMs and its own C++ attention, "
              "which reads the paged cache in place with a vectorised exp. Engine start includes lowering (from the "
              "cache when hit) and `mx.compile` tracing of the first steps.", ""]
    P += ["**Host time.** Calling the compiled step replays its recorded graph, one lazy array per node (~1,500: 30 "
          "layers of matmuls, splits, reshapes, RoPE, cache gathers and writes), its cost growing with the node count. "
          "Overlapping host and device (building step n+1 while step n runs, `LoweredModel.step_lazy`, as the GPU "
          "suite's pipelined loop does) hides it, but vLLM's sampler needs each step's logits on the host, so the plugin "
          "runs the synchronous loop measured here.", ""]
    return P
