"""Markdown tables of a GPU results file (benchmarks/results/gpu-<class>.json), as docs/benchmarks.md shows them.

    python benchmarks/gpu.py report benchmarks/results/gpu-h100.json [--sides ours,mlx_lm] [--write]

--write puts them between <!-- gpu:begin --> and <!-- gpu:end --> of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import write_doc_section

NAMES = {"llama8b": "Llama-3-8B shape", "smollm2": "SmolLM2-135M shape"}


def title(part: str) -> str:
    """A results part's model in words: "llama8b q4g64" -> "Llama-3-8B shape, 4-bit weights (groups of 64)"."""
    model, _, quant = part.partition(" ")
    if not quant:
        return NAMES.get(model, model)
    bits, _, group = quant.removeprefix("q").partition("g")
    return f"{NAMES.get(model, model)}, {bits}-bit weights (groups of {group})"


def _by_round(rows: list[dict], side: str, kind: str, size: int, metric: str) -> dict[int, float]:
    key = "batch" if kind == "decode" else "tokens"
    return {r["round"]: r[metric] for r in rows if r["side"] == side and r["kind"] == kind and r[key] == size}


def ab_table(part: dict, sides: list[str] | None = None) -> str:
    """ms a step, each side's median over rounds, and in brackets the median per-round ratio of its time to the
    first side's (> 1: the first side is faster)."""
    rows = part["rows"]
    sides = [s for s in (sides or part["sides"]) if any(r["side"] == s for r in rows)]
    lines = ["| workload | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    work = [("decode", b, m) for b in sorted({r["batch"] for r in rows if r["kind"] == "decode"}) for m in ("sync", "async")]
    work += [("prefill", n, "") for n in sorted({r["tokens"] for r in rows if r["kind"] == "prefill"})]
    for kind, size, mode in work:
        by = {s: _by_round(rows, s, kind, size, f"{mode}_ms" if mode else "ms") for s in sides}
        cells = []
        for side in sides:
            mine, first = by[side], by[sides[0]]
            cell = f"{statistics.median(mine.values()):.2f}" if mine else "n/a"
            if mine and side != sides[0]:
                cell += f" ({statistics.median(mine[k] / first[k] for k in mine if k in first):.2f}x)"
            cells.append(cell)
        name = f"decode batch {size}, {mode}" if kind == "decode" else f"prefill {size}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ceiling_line(data: dict, model: str = "llama8b") -> str | None:
    """Batch-1 decode against the bandwidth ceiling: bytes a step must read / the device's copy bandwidth."""
    part = data.get("ab", {}).get(model)
    copy = data.get("bandwidth", {}).get("torch copy")
    if not part or not copy or not copy["rows"]:
        return None
    gb_s = copy["rows"][-1]["GB_s"]["median"]
    step_bytes = part["decode_bytes_b1"]["total"]
    ceiling = gb_s * 1e9 / step_bytes
    cells = []
    for side in ("ours", "mlx_lm"):
        ms = {m: _by_round(part["rows"], side, "decode", 1, f"{m}_ms") for m in ("sync", "async")}
        if ms["sync"]:
            tok = {m: 1e3 / statistics.median(v.values()) for m, v in ms.items()}
            cells.append(f"{side} async {tok['async']:.0f} tok/s = **{100 * tok['async'] / ceiling:.0f}%**, "
                         f"sync {tok['sync']:.0f} = {100 * tok['sync'] / ceiling:.0f}%")
    return (f"{title(model)}, batch 1: a step reads {step_bytes / 1e9:.2f} GB; at the measured copy bandwidth "
            f"of {gb_s:.0f} GB/s the ceiling is **{ceiling:.0f} tok/s**. " + "; ".join(cells) + ".")


def profile_table(data: dict) -> str | None:
    rows = []
    for what, part in data.get("profile", {}).items():
        for r in part["rows"]:
            k = r.get("kernels") or {"per_step": float("nan"), "gpu_ms_per_step": float("nan")}
            rows.append(f"| {what} | {r['system']} | {k['per_step']:.0f} | {k['gpu_ms_per_step']:.2f} | "
                        f"{r['record']:.2f} | {r['launch']:.2f} | {r['wait']:.2f} | {r['total']:.2f} |")
    if not rows:
        return None
    return "\n".join(["| step | system | kernels | GPU ms | host: record ms | launch ms | wait ms | step ms |",
                      "|---|---|---|---|---|---|---|---|", *rows])


def checks_table(data: dict) -> str | None:
    rows = [r for part in data.get("checks", {}).values() for r in part["rows"]]
    if not rows:
        return None
    lines = ["| model | dtype | max abs error | max abs logit | relative | tolerance | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['max_abs_err']:.2g} | {r['max_abs_logit']:.2f} | "
                     f"{r['rel_err']:.3g} | {r['tolerance_rel']:g} | {'pass' if r['ok'] else '**fail**'} |")
    return "\n".join(lines)


def torch_table(data: dict) -> str | None:
    parts = data.get("torch", {})
    if not parts:
        return None
    lines = ["| model, system | workload | ms | tok/s |", "|---|---|---|---|"]
    for what, part in parts.items():
        for r in part["rows"]:
            work = f"decode batch {r['batch']}" if r["kind"] == "decode" else f"prefill {r['tokens']}"
            lines.append(f"| {what} | {work} | {r.get('step_ms', r.get('ms')):.2f} | {r['tok_s']['median']:,.0f} |")
    return "\n".join(lines)


def kernel_table(data: dict) -> str | None:
    part = data.get("kernel", {}).get("paged decode attention")
    if not part:
        return None
    configs = list(dict.fromkeys(r["config"] for r in part["rows"]))
    batches = sorted({r["batch"] for r in part["rows"]})
    us = {(r["config"], r["batch"]): r["gpu_us"] for r in part["rows"]}
    lines = ["| batch | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(f"{us[c, b]:.1f}" if (c, b) in us else "n/a" for c in configs) + " |")
    return "\n".join(lines)


def quantized_kernel_table(data: dict) -> str | None:
    """GPU us a call and GB/s of ours, MLX's 4-bit and MLX's bf16 GEMV per 8B matrix and M; our best block shape."""
    part = data.get("kernel", {}).get("quantized gemv")
    if not part or not part["rows"]:
        return None
    at = {(r["shape"], r["m"], r["side"]): r for r in part["rows"]}
    cases = list(dict.fromkeys((r["shape"], r["n"], r["k"], r["m"]) for r in part["rows"]))
    lines = [f"{part['bits']}-bit weights in groups of {part['group_size']}, bf16 activations and scales; GPU us a call "
             "(GB/s moved: codes, scales, biases, activations, output); the best of our block shapes (warps x rows) "
             "where swept.", "",
             "| matrix | N x K | M | ours | MLX 4-bit | MLX bf16 | ours vs MLX 4-bit | our best shape |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, n, k, m in cases:
        def cell(side):
            r = at.get((shape, m, side))
            return f"{r['gpu_us']:.1f} ({r['GB_s']:,.0f})" if r else "n/a"
        ours, theirs = at.get((shape, m, "ours")), at.get((shape, m, "mlx_q4"))
        ratio = f"{theirs['gpu_us'] / ours['gpu_us']:.2f}x" if ours and theirs else "n/a"
        tunes = [r for (s_, m_, side), r in at.items() if s_ == shape and m_ == m and side.startswith("tune")]
        best = min(tunes, key=lambda r: r["gpu_us"]) if tunes else None
        best_cell = f"{best['side'].removeprefix('tune ')}: {best['gpu_us']:.1f}" if best else ""
        lines.append(f"| {shape} | {n} x {k} | {m} | {cell('ours')} | {cell('mlx_q4')} | {cell('mlx_bf16')} | {ratio} | "
                     f"{best_cell} |")
    return "\n".join(lines)


def report(path: str, sides: list[str] | None = None) -> str:
    if not Path(path).is_file():
        raise SystemExit(f"no results file {path}: a measuring command (check, ab, profile, ...) writes it with --out")
    data = json.loads(Path(path).read_text())
    out = []
    for model, part in data.get("ab", {}).items():
        out += [f"### {title(model)}: ms a step", "",
                f"Each side's median over {part['rounds']} paired rounds; in brackets the median per-round ratio of its "
                "time to the first column's (> 1: the first column is faster).", "", ab_table(part, sides), ""]
    ceilings = "\n\n".join(filter(None, (ceiling_line(data, m) for m in data.get("ab", {}) if m.startswith("llama8b"))))
    for heading, text in (("Bandwidth ceiling", ceilings), ("Profiles", profile_table(data)),
                        ("Correctness", checks_table(data)), ("torch", torch_table(data)),
                        ("Decode attention alone, GPU us a call", kernel_table(data)),
                        ("Quantized GEMV alone", quantized_kernel_table(data))):
        if text:
            out += [f"### {heading}", "", text, ""]
    return "\n".join(out)


def main(args) -> int:
    text = report(args.file, [s for s in args.sides.split(",") if s] or None)
    print(text)
    if args.write:
        write_doc_section(args.section, text)
    return 0
