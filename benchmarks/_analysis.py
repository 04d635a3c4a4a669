"""The 'gaps' part of docs/benchmarks.md: one paragraph per goal, numbers filled in from the run.

The reasoning in these paragraphs was checked by hand against profiles and the code (see the report of
the session that wrote them); the numbers are this run's. Edit the text when the causes change.
"""

from __future__ import annotations


def _med(s):
    return s["median"] if s else float("nan")


def findings(res: dict) -> str:
    c32, c16 = res["compiler_f32"], res["compiler_bf16"]
    bw = res["bandwidth"]["gb_s"]["median"]
    host = c32.get("host") or {}
    ms = {k: 1e3 * v for k, v in host.get("median_s", {}).items()}
    ceil = bw * 1e9 / c32["decode_step_weight_bytes"]
    ours_dec, ref_dec = c32["ours"]["decode"]["median"], c32["mlx_lm"]["decode"]["median"]
    e2e = res.get("e2e") or {}

    def tok(mode, n):
        try:
            vals = sorted(r["tok_s"] for r in e2e[mode]["levels"][str(n)])
            return vals[len(vals) // 2] if len(vals) % 2 else sum(vals[len(vals) // 2 - 1: len(vals) // 2 + 1]) / 2
        except KeyError:
            return float("nan")

    loads = [l["load_start"] for l in res.get("loads", [])]
    P = ["## Gaps, causes and what to do", ""]
    if loads and max(loads) > 1.0:
        P += [f"**Noise warning.** The machine is shared; load averages of up to {max(loads):.1f} were recorded at the "
              "start of a section (2 cores: anything above ~1 means another process competes for a core). Absolute "
              "tok/s of this run are lower than on a quiet machine; the ours/mlx-lm ratios are interleaved repeats in one "
              "process and hold up better, but the min-max spread shows how much each moved.", ""]
    P += [
        f"**Decode vs mlx-lm (f32 {c32['ratio']['decode']['median']:.2f}x, bf16 {c16['ratio']['decode']['median']:.2f}x).** "
        "A batch-1 decode step is matrix-vector products plus attention. Both models now reach the same BLAS path: "
        "`runtime/matvec.c` (built by `runtime/matvec.py`, wired in by `runtime/blas.py`) sends MLX's M=1 `cblas_sgemm` "
        "calls to OpenBLAS's `sgemv`, which streams weights 1.6-3.4x faster than its sgemm at M=1 here (mlx-lm runs in "
        "the same process, so it gets the shim too and the ratio stays like for like). What differs is attention: ours "
        "reads a paged cache - a block-table gather of each sequence's context per layer - where mlx-lm slices a "
        "contiguous per-sequence cache. The cache is head-major (`[kv_heads, blocks, block, head_dim]`) and gathered by "
        "whole blocks, and pure-decode steps skip the query/row index gathers; before those changes a decode layer's "
        "attention cost 3x more at batch 1 (0.6 vs 0.2 ms CPU) and 7x more at batch 32. The rest is graph replay on the "
        "host (see host overhead) and the mask an array mask costs SDPA on the CPU backend. The ratio depends on the "
        "context: in the session that wrote this, an interleaved run at a 64-token prompt measured 1.21x (ours 11.3 vs "
        "mlx-lm 10.1 tok/s, loaded machine), this table's 512-token prompt far less. Our per-layer attention scales with "
        "the bucketed context (Lk rounded up to a power of two: 1024 keys gathered per layer at 512-576 tokens), mlx-lm's "
        "with the real one; finer Lk buckets and a decode path that does not copy K/V are the next things to try "
        "(a hypothesis, not yet profiled at this length).",
        "",
        f"**Prefill vs mlx-lm (f32 {c32['ratio']['prefill']['median']:.2f}x, bf16 {c16['ratio']['prefill']['median']:.2f}x).** "
        "The projections are the same GEMMs (OpenBLAS sgemm, M = prompt length), which take most of a 512-token prefill; "
        "vLLM's merged qkv_proj and gate_up_proj make fewer, larger calls than mlx-lm's separate q/k/v and gate/up. "
        "What surrounds them: ours writes the prompt's K/V into the paged cache and gathers it back (whole blocks) and "
        "builds a boolean mask from positions, where mlx-lm passes `mask=\"causal\"`; RoPE takes a per-token offset array. "
        "A plain-prefill fast path (attend to the step's own K/V with a causal mask when every sequence starts at "
        "position 0) would drop the gather; not done.",
        "",
        f"**Bandwidth ceiling (ours {ours_dec:.1f} tok/s = {100 * ours_dec / ceil:.0f}% of {ceil:.0f} tok/s; mlx-lm "
        f"{100 * ref_dec / ceil:.0f}%).** A decode step must read {c32['decode_step_weight_bytes'] / 1e6:.0f} MB of f32 "
        f"weights; at the measured {bw:.1f} GB/s that is {1e3 / ceil:.0f} ms, and our step takes {1e3 / ours_dec:.0f} ms. "
        "OpenBLAS 0.3.21's sgemv reaches 10-28 GB/s on these matrices in isolation (single calls, in cache or not), "
        "so the products alone would take ~25-50 ms; the remainder is ~200 small MLX ops per step on one host thread "
        "(MLX's CPU backend runs ops serially; only BLAS is multi-threaded), paged attention and graph replay. "
        "bf16 is far below its ceiling because MLX's CPU backend has no fast bf16 GEMM/GEMV (bf16 decode is slower "
        "than f32 here despite half the bytes). Moving this further needs MLX CPU kernels (threaded elementwise ops, "
        "bf16 GEMV), not lowering changes.",
        "",
    ]
    if e2e:
        if res.get("e2e_note"):
            P += [f"**Note on section 2.** {res['e2e_note']}", ""]
        P += [
            f"**vLLM end to end (32 requests: plugin MLX {tok('mlx', 32):.0f} vs built-in CPU {tok('cpu', 32):.0f} "
            f"tok/s, {tok('mlx', 32) / tok('cpu', 32):.2f}x; batch 1: {tok('mlx', 1):.1f} vs {tok('cpu', 1):.1f}).** "
            "The built-in CPU platform runs oneDNN/MKL GEMMs with its own CPU attention kernels; at batch 32 a decode "
            "step is a real GEMM (M=32), where OpenBLAS is competitive, but our step also gathers every sequence's "
            "context per layer and pads Lk to a power of two; prefill (M = thousands of tokens) is GEMM-bound, and "
            "OpenBLAS 0.3.21's sgemm is slower than the oneDNN kernels the built-in platform uses on this AVX-512 CPU. "
            "Two plugin bugs found while measuring this are fixed: every step ran the MLX step twice (vLLM's "
            "`hidden_states[:num_tokens]` bookkeeping slice re-ran it for all tokens) and the `auto` KV budget held "
            "room for only 4 full-length sequences, so vLLM ran ~14 of 32 requests at once. Plugin torch "
            "(`VLLM_METAL_USE_MLX=0`) is the same vLLM model as the built-in platform, eager, but through our runner "
            "and the torch-native attention path, so the built-in one is the stronger baseline. "
            "Engine start: the plugin's includes lowering (from the cache when hit: ~1 s, see 4) and `mx.compile` tracing on the "
            "first steps; the built-in eager one skips inductor (its compiled mode takes 70-100 s to start here).",
            "",
        ]
    if host:
        P += [
            f"**Host overhead ({host['host_pct']:.1f}% of a batch-1 decode step, {host['host_s'] * 1e3:.1f} ms of "
            f"{ms['total']:.0f} ms).** The biggest host part is calling the compiled step ({ms['call']:.1f} ms): "
            "`mx.compile` replays its recorded tape, building one lazy array per node (~1,500 nodes: 30 layers of "
            "matmuls, splits, reshapes, RoPE, paged-attention gathers/scatters), and flattens ~180 weight and 60 cache "
            f"arrays; then `attention_arrays` ({ms['attention_arrays']:.1f} ms of numpy). Measured on a toy compiled step "
            "with 183 weights (~180 nodes): 0.23 ms per call with the weights passed as a dict, 0.17 ms with them closed "
            "over (`functools.partial(step, weights)` before `mx.compile`), so closing over the weights saves only "
            "~0.06 ms; the cost scales with graph nodes. Cheap fixes (not applied): (a) a decode-only fast path in "
            "`runtime/batch.py` `attention_arrays` (all q_len == 1: `q_index = arange`, `q_pos = positions`, no "
            "`np.where`/`repeat`/`diff`); (b) fewer emitted nodes per layer (e.g. `mx.reciprocal(inv_freq)` is emitted "
            "twice per layer; hoist it once per step); (c) the real cure, as mlx-lm does: overlap host and device by "
            "building step n+1 while step n evaluates (`mx.async_eval`, feeding the lazy argmax token instead of "
            "`.item()`); `LoweredModel.step_lazy` and `Driver.prepare` provide this (benchmarks/gpu.py's async decode "
            "uses it), but this table measures the synchronous loop, which is what vLLM's sampler imposes: it needs the "
            "logits on the host every step. The share grows as the math gets faster: at mlx-lm's best f32 decode "
            "(~60 ms/step on a quiet machine) the same host time is ~10%.",
            "",
        ]
    return "\n".join(P)
