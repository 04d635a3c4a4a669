"""The benchmark suite: one command prints the whole table and writes docs/benchmarks.md.

    .venv/bin/python benchmarks/run.py            # full (about 17-18 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/run.py --quick    # fewer repeats and tokens (about 8 min)
    .venv/bin/python benchmarks/run.py --no-write # print only

Sections (each in fresh child processes; before each one the run waits, up to 2 minutes, until under
half a core is busy over 3 s - other jobs, not the decaying load average of its own previous section;
what it saw is recorded in the table):
 1. compiler quality: lowered SmolLM2 (lowering.driver, batch 1) vs mlx-lm's model, same MLX/BLAS/dtype
 2. end to end in vLLM: this plugin (MLX) vs VLLM_METAL_USE_MLX=0 vs vLLM's built-in CPU platform
 3. the limit: memory bandwidth x bytes of weights per decode step -> decode ceiling, achieved %
 4. overheads: lowering cold / from the cache, host time per decode step
Every figure is the median of repeated runs after warm-up, with (min-max); ours/mlx-lm ratios are
taken per repeat inside one process (interleaved runs) and then summarised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _analysis import findings  # noqa: E402
from _common import ROOT, fmt, machine, run_child, wait_for_quiet  # noqa: E402

E2E_MODES = {
    "mlx": ("plugin, MLX (lowered)", {"VLLM_METAL_USE_MLX": "1"}),
    "torch": ("plugin, `VLLM_METAL_USE_MLX=0` (torch eager)", {"VLLM_METAL_USE_MLX": "0"}),
    "cpu": ("vLLM built-in CPU platform (eager)",
            {"VLLM_PLUGINS": "none", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plan(quick: bool) -> dict:
    if quick:
        return {"f32": dict(prompt=512, gen=64, repeats=2), "bf16": dict(prompt=128, gen=16, repeats=2),
                "e2e": dict(levels="1,8,32", gen=64, repeats=1), "bw_repeats": 5}
    return {"f32": dict(prompt=512, gen=128, repeats=3), "bf16": dict(prompt=128, gen=32, repeats=2),
            "e2e": dict(levels="1,8,32", gen=128, repeats=2), "bw_repeats": 7}


def _checkpoint(args, res) -> None:
    """Raw results so far (a long run on a busy machine can be re-rendered with --from-json)."""
    Path(args.save_json).write_text(json.dumps(res, indent=1, default=str))


def collect(args) -> dict:
    p = plan(args.quick)
    res = {"machine": machine(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip(),
           "command": " ".join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]]), "plan": p, "loads": []}
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()

    res["loads"].append(wait_for_quiet("3 bandwidth"))
    log("bandwidth")
    res["bandwidth"] = run_child("_bandwidth", ["2", str(p["bw_repeats"])], env)

    for dt in ("f32", "bf16"):
        res["loads"].append(wait_for_quiet(f"1 compiler {dt}"))
        log(f"compiler quality {dt} (+ overheads)" if dt == "f32" else f"compiler quality {dt}")
        c = p[dt]
        extra = ["--overheads"] if dt == "f32" else []
        res[f"compiler_{dt}"] = run_child("_compiler", ["--dtype", dt, "--prompt", str(c["prompt"]), "--gen",
                                                        str(c["gen"]), "--repeats", str(c["repeats"]), *extra], env)
        _checkpoint(args, res)

    res["e2e"] = {}
    if not args.skip_e2e:
        for mode, (_, mode_env) in E2E_MODES.items():
            res["loads"].append(wait_for_quiet(f"2 vLLM {mode}"))
            log(f"vLLM end to end: {mode}")
            e = p["e2e"]
            res["e2e"][mode] = run_child("_vllm_e2e", ["--mode", mode, "--concurrency", e["levels"], "--gen",
                                                       str(e["gen"]), "--repeats", str(e["repeats"])],
                                         dict(env, **mode_env), timeout=1200)
            _checkpoint(args, res)
    res["total_s"] = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------------------------- report
def _s(values):
    from _common import summary

    values = [v for v in values if v is not None]
    return summary(values) if values else None


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def _quiet_line(loads: list[dict]) -> str:
    if loads and "busy_start" in loads[0]:
        return ("- **Quiet check:** the machine is shared; before each section the run waits (up to 2 min) until under 0.5 "
                "cores are busy over 3 s. Cores busy when each section started (1-min load average): " + ", ".join(
                    f"{l['section']}: {l['busy_start']} ({l['load_start']})"
                    + (f", waited {l['waited_s']:.0f} s" if l["waited_s"] > 1 else "") for l in loads))
    return ("- **Load average** (1 min) when each section started; a section waited up to 2 min for load <= 1.0: "
            + ", ".join(f"{l['section']}: {l['load_start']}" + (f" (was {l['load_first']}, waited {l['waited_s']:.0f} s)"
                                                              if l["waited_s"] > 1 else "") for l in loads))


def report(res: dict) -> str:
    m, p = res["machine"], res["plan"]
    c32, c16 = res["compiler_f32"], res["compiler_bf16"]
    bw = res["bandwidth"]["gb_s"]
    L = []
    L += ["# Benchmarks", "",
          "Produced by `benchmarks/run.py` (one command; it also wrote this file). Numbers are from the run below;",
          "rerun to refresh them. Model: SmolLM2-135M-Instruct (bundled, 134.5M parameters, 30 layers, tied embeddings).",
          "",
          f"- **Machine:** {m['cores']} cores, `{m['cpu']}`, {m['mem_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}",
          f"- **Date:** {res['date']}",
          f"- **Command:** `{res['command']}` (total {res.get('total_s', float('nan')) / 60:.1f} min)",
          f"- **BLAS used by MLX:** `{(c32.get('blas') or {}).get('sgemm_library')}`, MLX {c32.get('mlx')}",
          "- **Statistic:** median (min-max) over repeats after a warm-up run; ratios are per repeat inside one process "
          "(ours and mlx-lm interleaved), then summarised.",
          _quiet_line(res["loads"]),
          ""]

    # goals
    ratio_dec, ratio_pre = c32["ratio"]["decode"]["median"], c32["ratio"]["prefill"]["median"]
    ceiling32 = bw["median"] * 1e9 / c32["decode_step_weight_bytes"]
    pct = 100 * c32["ours"]["decode"]["median"] / ceiling32
    host = c32.get("host", {})
    e2e = res.get("e2e", {})

    def tok(mode, level):
        try:
            return _s([r["tok_s"] for r in e2e[mode]["levels"][str(level)]])
        except KeyError:
            return None

    r32 = None
    if tok("mlx", 32) and tok("cpu", 32):
        r32 = tok("mlx", 32)["median"] / tok("cpu", 32)["median"]
    L += ["## Goals (issue 7) and where we stand", "",
          "| goal | where we are | status |", "|---|---|---|",
          f"| decode >= 1.0x mlx-lm (f32) | {fmt(c32['ratio']['decode'], 2)}x | {_status(ratio_dec >= 1.0)} |",
          f"| prefill >= 1.0x mlx-lm (f32) | {fmt(c32['ratio']['prefill'], 2)}x | {_status(ratio_pre >= 1.0)} |",
          f"| decode >= 1.0x mlx-lm (bf16) | {fmt(c16['ratio']['decode'], 2)}x | {_status(c16['ratio']['decode']['median'] >= 1)} |",
          f"| prefill >= 1.0x mlx-lm (bf16) | {fmt(c16['ratio']['prefill'], 2)}x | {_status(c16['ratio']['prefill']['median'] >= 1)} |",
          f"| >= 60% of the bandwidth ceiling at batch 1 (f32) | {pct:.0f}% ({c32['ours']['decode']['median']:.1f} of "
          f"{ceiling32:.1f} tok/s) | {_status(pct >= 60)} |",
          f"| plugin >= 1.0x built-in CPU platform at 32 requests | "
          + (f"{r32:.2f}x ({tok('mlx', 32)['median']:.1f} vs {tok('cpu', 32)['median']:.1f} tok/s)" if r32 else "not run")
          + f" | {_status(None if r32 is None else r32 >= 1.0)} |",
          f"| host overhead < 5% of a decode step | {host.get('host_pct', float('nan')):.1f}% "
          f"({1e3 * host.get('host_s', float('nan')):.1f} of {1e3 * host.get('median_s', {}).get('total', float('nan')):.0f} ms) | "
          f"{_status(host.get('host_pct', 100) < 5) if host else 'n/a'} |",
          ""]

    # 1
    L += ["## 1. Compiler quality: lowered model vs mlx-lm's hand-written model", "",
          "Both on MLX's CPU backend with the same BLAS, same weights, same dtype, same harness (batch 1, greedy, "
          "one forward + argmax + `.item()` per token). Ours: vLLM's torch model -> `capture_vllm` -> passes -> "
          "compiled MLX, driven by `lowering.driver`. mlx-lm 0.32.2: `mlx_lm.load(path, model_config={'rope_theta': 1e5})`.", "",
          "| dtype | prompt / new tokens | repeats | prefill ours tok/s | prefill mlx-lm | **prefill ratio** | "
          "decode ours tok/s | decode mlx-lm | **decode ratio** | greedy tokens equal |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for c in (c32, c16):
        L.append(f"| {c['dtype']} | {c['prompt']} / {c['gen']} | {c['repeats']} | {fmt(c['ours']['prefill'])} | "
                 f"{fmt(c['mlx_lm']['prefill'])} | **{fmt(c['ratio']['prefill'], 2)}x** | {fmt(c['ours']['decode'], 2)} | "
                 f"{fmt(c['mlx_lm']['decode'], 2)} | **{fmt(c['ratio']['decode'], 2)}x** | "
                 f"{c['greedy_agree']}/{c['greedy_of']} |")
    L += ["", f"bf16 uses a {c16['prompt']}-token prompt and {c16['gen']} new tokens: MLX's CPU backend has no fast bf16 "
          "GEMM, so bf16 is ~10x slower than f32 here and a 512-token bf16 prefill alone would take ~25 s per run.",
          f"Sanity: greedy continuation, ours: `{c32['text_ours']!r}`; mlx-lm: `{c32['text_mlx_lm']!r}`.", ""]

    # 2
    e = p["e2e"]
    L += ["## 2. End to end in vLLM 0.32 (`LLM.generate`, offline)", "",
          f"float32, prompts of 128 distinct random tokens, {e['gen']} new tokens each, greedy, `ignore_eos=True`, "
          f"prefix caching off, `max_num_seqs=32`; {e['repeats']} repeats per level after a warm-up generate at that "
          "level (8 new tokens: it compiles every step shape). One engine process per configuration. Throughput = "
          "output tokens / wall time of the `generate` call. TTFT = median over requests of "
          "`RequestOutput.metrics.first_token_latency` (includes queueing behind the other prompts' prefill); "
          "TPOT = median over requests of (last - first token time) / (tokens - 1).", ""]
    if e2e:
        levels = e["levels"].split(",")
        L.append("| configuration | engine start s | " + " | ".join(f"out tok/s @{n}" for n in levels) + " | "
                 + " | ".join(f"TTFT s @{n}" for n in levels) + " | " + " | ".join(f"TPOT ms @{n}" for n in levels) + " |")
        L.append("|---|---|" + "---|" * (3 * len(levels)))
        for mode, (label, _) in E2E_MODES.items():
            if mode not in e2e:
                continue
            r = e2e[mode]
            cells = [fmt(_s([x["tok_s"] for x in r["levels"][n]])) for n in levels]
            cells += [fmt(_s([x["ttft_s"] for x in r["levels"][n]]), 2) for n in levels]
            cells += [fmt(_s([1e3 * x["tpot_s"] if x["tpot_s"] else None for x in r["levels"][n]]), 0) for n in levels]
            L.append(f"| {label} | {r['start_s']:.0f} | " + " | ".join(cells) + " |")
        L.append("")
        if tok("mlx", 1) and tok("cpu", 1):
            L.append("Plugin MLX / built-in CPU (ratio of medians; separate processes run one after the other): "
                     + ", ".join(f"@{n}: {tok('mlx', n)['median'] / tok('cpu', n)['median']:.2f}x" for n in levels
                                 if tok("mlx", n) and tok("cpu", n)) + ".  Plugin MLX / plugin torch: "
                     + ", ".join(f"@{n}: {tok('mlx', n)['median'] / tok('torch', n)['median']:.2f}x" for n in levels
                                 if tok("mlx", n) and tok("torch", n)) + ".")
        L.append("Sample (greedy, 'The capital of France is'): " + "; ".join(
            f"{mode}: `{r.get('sample_text', '')!r}`" for mode, r in e2e.items()))
        L.append("")
    else:
        L += ["(skipped with --skip-e2e)", ""]

    # 3
    L += ["## 3. The limit: memory bandwidth and the decode ceiling", "",
          f"Bandwidth: torch `copy_` of a 1 GiB float32 buffer, 2 threads, counted as read + write: "
          f"**{fmt(bw)} GB/s** ({res['bandwidth']['gb_s']['n']} repeats). A batch-1 decode step must read every "
          "weight once (the tied embedding table once, as the LM head); KV reads at these lengths are < 1% and ignored.", "",
          "| dtype | weight bytes read per decode step | ceiling tok/s | ours (driver) tok/s | % of ceiling | mlx-lm tok/s | % | plugin in vLLM @1 tok/s | % |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in (c32, c16):
        ceil = bw["median"] * 1e9 / c["decode_step_weight_bytes"]
        ours, ref = c["ours"]["decode"]["median"], c["mlx_lm"]["decode"]["median"]
        plug = tok("mlx", 1)["median"] if (c is c32 and tok("mlx", 1)) else None
        L.append(f"| {c['dtype']} | {c['decode_step_weight_bytes'] / 1e6:.1f} MB | {ceil:.1f} | {ours:.2f} | "
                 f"{100 * ours / ceil:.0f}% | {ref:.2f} | {100 * ref / ceil:.0f}% | "
                 + (f"{plug:.2f} | {100 * plug / ceil:.0f}%" if plug else "n/a | n/a") + " |")
    L.append("")

    # 4
    lo = c32["lowering"]
    lc = c32.get("lower_cached", {})
    L += ["## 4. Overheads", "",
          "Lowering SmolLM2 f32 (one run; cold = a fresh process, nothing cached):", "",
          "| stage | seconds |", "|---|---|",
          f"| build vLLM's torch model + load weights (`build_vllm_model`, not lowering) | {lo['build_vllm_model_s']:.1f} |",
          f"| capture (`torch.export` of the whole step) | {lo['capture_s']:.1f} |",
          f"| passes | {lo['passes_s']:.2f} |",
          f"| emit MLX source | {lo['emit_s']:.2f} |",
          f"| weights -> MLX + KV cache (`build_model`) | {lo['mlx_weights_s']:.2f} |",
          f"| first prefill + 16 decode steps (includes `mx.compile` tracing of each new shape) | {lo['first_run_s']:.1f} |",
          f"| `lower_cached` miss (capture + passes + emit + store), as the plugin does it | "
          f"{lc.get('miss', {}).get('s', float('nan')):.1f} |",
          f"| `lower_cached` hit (load verified artefact + weights -> MLX) | {lc.get('hit', {}).get('s', float('nan')):.2f} |",
          ""]
    if host:
        ms = {k: 1e3 * v for k, v in host["median_s"].items()}
        L += [f"Host time per batch-1 decode step of the lowered model (f32, context ~128-176 tokens, medians of 48 steps):", "",
              "| part | ms | % of step |", "|---|---|---|"]
        for k, label in (("driver_build", "lowering.driver: StepInput from the sequence (numpy)"),
                         ("attention_arrays", "runtime.batch.attention_arrays (numpy)"),
                         ("to_mlx", "numpy -> mx.array (attention arrays, ids, positions)"),
                         ("call", "calling the `mx.compile`d step (graph replay, host only)"),
                         ("eval", "`mx.eval` (the math, on 2 cores)")):
            L.append(f"| {label} | {ms[k]:.2f} | {100 * ms[k] / ms['total']:.1f}% |")
        L += [f"| **whole step** | {ms['total']:.1f} | host total {host['host_pct']:.1f}% |", "",
              "cProfile of 8 decode steps (top by own time):", "", "```", *host["profile_top"], "```", ""]
    return "\n".join(L)


GPU_BEGIN, GPU_END = "<!-- gpu:begin -->", "<!-- gpu:end -->"


def _gpu_section(doc: Path) -> str:
    """The GPU section (benchmarks/gpu.py, run on the lent GPU machine) is kept as it is: this CPU
    suite cannot re-measure it."""
    old = doc.read_text() if doc.exists() else ""
    if GPU_BEGIN not in old or GPU_END not in old:
        return ""
    return "\n" + old[old.index(GPU_BEGIN):old.index(GPU_END) + len(GPU_END)] + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats / new tokens (states them in the table)")
    ap.add_argument("--skip-e2e", action="store_true", help="skip section 2 (vLLM engines)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    ap.add_argument("--from-json", help="re-render a previous run's results JSON")
    ap.add_argument("--save-json", default=os.path.join(tempfile.gettempdir(), "vllm-metal-bench-last.json"),
                    help="where the raw results go (default: %(default)s)")
    args = ap.parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
    else:
        res = collect(args)
        Path(args.save_json).write_text(json.dumps(res, indent=1, default=str))
        log(f"raw results in {args.save_json}")
    text = report(res) + "\n" + findings(res)
    print(text)
    if not args.no_write:
        doc = ROOT / "docs" / "benchmarks.md"
        doc.write_text(text + "\n" + _gpu_section(doc))
        log("wrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
