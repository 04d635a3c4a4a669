"""Tables of the GPU section of docs/benchmarks.md from benchmarks/gpu.py's JSON results.

    .venv/bin/python benchmarks/gpu.py report benchmarks/results/gpu-r4-mlx.json benchmarks/results/gpu-r4b-mlx.json \\
        benchmarks/results/gpu-r2-torch-eager.json benchmarks/results/gpu-r1-torch.json \\
        benchmarks/results/gpu-r4-profile.json benchmarks/results/gpu-r4-profile-b128.json ...

Each file is one process's results (one system family); a table takes every system it finds, the
first file that has it winning. Prints markdown; the prose around it is written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

SYSTEMS = ("ours", "mlx_lm", "torch_eager", "torch_compile")


def _index(files: list[str]) -> dict:
    """(system, model, kind, size, mode) -> (tok/s median, file label)."""
    out = {}
    for f in files:
        data = json.loads(Path(f).read_text())
        for r in data["rows"]:
            if r.get("kind") not in ("prefill", "decode"):
                continue
            size = r.get("tokens") if r["kind"] == "prefill" else r.get("batch")
            key = (r["system"], r["model"], r["kind"], size, r.get("mode", "sync"))
            out.setdefault(key, (r["tok_s"]["median"], Path(f).stem))
    return out


def _cell(v) -> str:
    return "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None else f"**{a / b:.2f}x**"


def table(files: list[str], model: str) -> str:
    idx = _index(files)
    get = lambda s, kind, size, mode="sync": (idx.get((s, model, kind, size, mode)) or (None,))[0]  # noqa: E731
    lines = ["| workload | ours tok/s | mlx-lm | ours / mlx-lm | torch eager | ours / eager | torch.compile | ours / compile |",
             "|---|---|---|---|---|---|---|---|"]
    for n in (512, 4096):
        o, m, e, c = (get(s, "prefill", n) for s in SYSTEMS)
        lines.append(f"| prefill {n} (batch 1) | {_cell(o)} | {_cell(m)} | {_ratio(o, m)} | {_cell(e)} | {_ratio(o, e)} "
                     f"| {_cell(c)} | {_ratio(o, c)} |")
    for b in (1, 8, 32, 128):
        e, c = get("torch_eager", "decode", b), get("torch_compile", "decode", b)
        for mode in ("sync", "async"):
            o, m = get("ours", "decode", b, mode), get("mlx_lm", "decode", b, mode)
            best_o = max(x for x in (get("ours", "decode", b, "sync"), get("ours", "decode", b, "async"), 0) if x is not None)
            lines.append(f"| decode batch {b}, {mode} | {_cell(o)} | {_cell(m)} | {_ratio(o, m)} | "
                         + (f"{_cell(e)} | {_ratio(best_o or None, e)} | {_cell(c)} | {_ratio(best_o or None, c)} |"
                            if mode == "sync" else "| | | |"))
    return "\n".join(lines)


def kernel_ab(files: list[str], model: str) -> str | None:
    """Ours with the fused paged decode kernel vs the same run's composed attention (`ours_composed`), decode."""
    idx = _index(files)
    get = lambda s, b, mode: (idx.get((s, model, "decode", b, mode)) or (None,))[0]  # noqa: E731
    if not any(get("ours_composed", b, "sync") for b in (1, 8, 32, 128)):
        return None
    lines = ["| decode batch | ours, fused kernel (sync / async) | ours, composed attention | kernel / composed | mlx-lm |",
             "|---|---|---|---|---|"]
    for b in (1, 8, 32, 128):
        o = [get("ours", b, m) for m in ("sync", "async")]
        c = [get("ours_composed", b, m) for m in ("sync", "async")]
        m = [get("mlx_lm", b, x) for x in ("sync", "async")]
        lines.append(f"| {b} | {_cell(o[0])} / {_cell(o[1])} | {_cell(c[0])} / {_cell(c[1])} | "
                     f"{_ratio(o[0], c[0])} / {_ratio(o[1], c[1])} | {_cell(m[0])} / {_cell(m[1])} |")
    return "\n".join(lines)


def profile_table(files: list[str]) -> str | None:
    """Kernels and host/GPU time per decode step from `profile` results (any batch)."""
    rows = []
    for f in files:
        data = json.loads(Path(f).read_text())
        if data.get("part") != "profile":
            continue
        for model, systems in data.get("profile", {}).items():
            if not isinstance(systems, dict):
                continue
            for label, v in systems.items():
                if not isinstance(v, dict) or "total" not in v:
                    continue
                k = v.get("kernels") or {}
                rows.append(f"| {Path(f).stem} | {model}, batch {data.get('batch', 1)} | {label} | {k.get('per_step', 0):.0f} | "
                            f"{k.get('gpu_ms_per_step', 0):.2f} ms | {v['record']:.2f} ms | {v['launch']:.2f} ms | "
                            f"{v['wait']:.2f} ms | {v['total']:.2f} ms |")
    if not rows:
        return None
    return "\n".join(["| run | model | system | kernels / step | GPU kernel time / step | host: record | host: launch | wait | step |",
                      "|---|---|---|---|---|---|---|---|---|", *rows])


def runs_table(files: list[str], model: str) -> str | None:
    """ours / mlx-lm per `mlx` results file (one machine each): how much a ratio moves between runs."""
    runs = [f for f in files if json.loads(Path(f).read_text()).get("part") == "mlx"]
    if len(runs) < 2:
        return None
    idx = {f: _index([f]) for f in runs}
    head = " | ".join(f"{Path(f).stem}: ours, mlx-lm, ratio" for f in runs)
    lines = [f"| workload | {head} |", "|---|" + "---|" * len(runs)]
    work = [("prefill", n, "sync") for n in (512, 4096)] + [("decode", b, m) for b in (1, 8, 32, 128) for m in ("sync", "async")]
    for kind, size, mode in work:
        cells = []
        for f in runs:
            o = (idx[f].get(("ours", model, kind, size, mode)) or (None,))[0]
            m = (idx[f].get(("mlx_lm", model, kind, size, mode)) or (None,))[0]
            cells.append(f"{_cell(o)}, {_cell(m)}, {_ratio(o, m)}")
        name = f"prefill {size}" if kind == "prefill" else f"decode batch {size}, {mode}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ab_table(path: str, model: str) -> str | None:
    """One `gpu.py ab` file: ms a step, each side's median over rounds, and in brackets the median per-round ratio
    of its time to the first side's (> 1: the first side is faster), as docs/benchmarks.md prints them."""
    import statistics

    data = json.loads(Path(path).read_text())
    rows = [r for r in data["rows"] if r["model"] == model]
    if data.get("part") != "ab" or not rows:
        return None
    sides = list(dict.fromkeys(r["side"] for r in rows))
    lines = [f"{model}: ms a step (in brackets: the ratio to {sides[0]}, > 1: {sides[0]} is faster)", "",
             "| workload | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    work = [("decode", b, m) for b in sorted({r["batch"] for r in rows if r["kind"] == "decode"}) for m in ("sync", "async")]
    work += [("prefill", n, "ms") for n in sorted({r["tokens"] for r in rows if r["kind"] == "prefill"})]
    for kind, size, mode in work:
        metric = "ms" if kind == "prefill" else f"{mode}_ms"
        by = {side: {r["round"]: r[metric] for r in rows if r["side"] == side and r["kind"] == kind
                     and r.get("batch", r.get("tokens")) == size} for side in sides}
        first = by[sides[0]]
        cells = []
        for side in sides:
            mine = by[side]
            if not mine:
                cells.append("n/a")
                continue
            cell = f"{statistics.median(mine.values()):.2f}"
            if side != sides[0]:
                cell += f" ({statistics.median(mine[k] / first[k] for k in mine if k in first):.2f}x)"
            cells.append(cell)
        name = f"decode batch {size}, {mode}" if kind == "decode" else f"prefill {size}"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(files: list[str], write: bool = False) -> int:
    abs_ = [f for f in files if json.loads(Path(f).read_text()).get("part") == "ab"]
    for f in abs_:
        for model in ("llama8b", "smollm2"):
            t = ab_table(f, model)
            if t:
                print(f"\n### {Path(f).stem}\n\n{t}")
    files = [f for f in files if f not in abs_]
    if not files:
        return 0
    for model in ("llama8b", "smollm2"):
        print(f"\n### {model}\n")
        print(table(files, model))
        runs = runs_table(files, model)
        if runs:
            print(f"\n{model}: ours / mlx-lm in each run\n\n{runs}")
        ab = kernel_ab(files, model)
        if ab:
            print(f"\n{model}: fused kernel vs composed attention, same run\n\n{ab}")
    prof = profile_table(files)
    if prof:
        print(f"\n### profile\n\n{prof}")
    return 0
