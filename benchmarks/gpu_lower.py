"""Lowered artefacts for the GPU suite: transformers' Llama at each shape -> capture_hf -> passes -> emit.

    python benchmarks/gpu.py lower --out benchmarks/lowered
    python benchmarks/gpu.py lower --models llama8b:bfloat16 --quantize q4:64

writes <out>/<model>-<dtype>/ (with --quantize q4:64: <model>-<dtype>-q4g64/) with step.py (the emitted MLX
source), meta.json (parameter shapes and dtypes, tied aliases, the merged projections' recipes, the attention
layers, and which weights the step reads quantized with which bits and group) and constants.safetensors (the
non-parameter tensors the step reads). A quantized lowering needs only the quantized weights' shapes: the
program gets shape-correct placeholders (passes/fused/quantized.py `placeholders`), and whoever runs the step
quantizes its weights there. CPU only, no MLX: the GPU machine gets the folder carried along, since
torch.export of the HF model needs a newer torch than the one found there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import log
from gpu_workloads import load_config, torch_model
from lowering.capture import capture_hf
from lowering.emit import emit_source
from passes import default_manager
from passes.fused.quantized import placeholders
from runtime.config import QuantizeSpec, parse_quantize_spec


def folder_name(model: str, dtype: str, quantize: QuantizeSpec | None = None) -> str:
    """<model>-<dtype>, and -q<bits>g<group> for a quantized lowering."""
    return f"{model}-{dtype}" + (f"-q{quantize.bits}g{quantize.group_size}" if quantize else "")


def lower_program(model, name: str, quantize: QuantizeSpec | None = None):
    """capture_hf + the default passes + emit; with `quantize`, every linear and embedding weight the quantize
    pass takes reads placeholders of that format. Returns (source, program, info)."""
    program = capture_hf(model, name)
    if quantize is not None:
        program.quantized.update(placeholders(program, quantize.bits, quantize.group_size))
    t = time.perf_counter()
    results = default_manager().run(program)
    source = emit_source(program)
    info = {"capture_s": program.meta["capture_s"], "passes_emit_s": time.perf_counter() - t,
            "passes": {r.name: r.matched for r in results}}
    return source, program, info


def _aliases(model) -> dict[str, str]:
    """path -> canonical path for tied parameters (SmolLM2's lm_head is its embedding)."""
    first, out = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def quantized_sources(program) -> dict[str, list[int]]:
    """The model's weights the step reads quantized, path -> [bits, group_size]: a merged projection's
    (passes/merge_projections.py) by its sources, each quantized on its own before the merge."""
    read = set(program.weight_paths.values())
    return {s: [q.bits, q.group_size] for p, q in program.quantized.items() if p in read
            for s in program.derived.get(p, {"cat": [p]})["cat"]}


def save_artefact(folder: Path, model, source: str, program, info: dict) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    alias = _aliases(model)
    quantized = quantized_sources(program)
    parts = {f"{p.removesuffix('.weight')}.{part}" for p in quantized for part in ("scales", "biases")}
    read = set(program.weight_paths.values())
    derived = {p: r for p, r in program.derived.items() if p in read}
    # a merged projection (passes/merge_projections.py) is stored as its recipe; its sources go in params, a
    # quantized weight's scales and biases come with its codes
    paths = sorted((read - set(derived) | {s for r in derived.values() for s in r["cat"]}) - parts)
    meta = {"params": {}, "aliases": {}, "constants": [], "layers": [asdict(x) for x in program.attention],
            "derived": derived, "quantized": quantized, "torch": torch.__version__, **info}
    tensors = {program.weight_paths[k]: v for k, v in program.weights.items()}
    constants = {}
    for path in paths:
        if path in params:
            t = params[path]
            meta["params"][path] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            if alias[path] != path and alias[path] in paths:  # export names a tied tensor once; both if used twice
                meta["aliases"][path] = alias[path]
        else:
            meta["constants"].append(path)
            constants[path] = tensors[path].detach().contiguous().clone()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step.py").write_text(source)
    save_file(constants or {"_": torch.zeros(1)}, str(folder / "constants.safetensors"))
    meta["source_sha256"] = hashlib.sha256(source.encode()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def lower(models: str, out: Path, quantize: QuantizeSpec | None = None) -> dict:
    """Each `model:dtype` of the comma-separated `models` lowered into `out` (quantized with `quantize`)."""
    report = {"torch": torch.__version__}
    for spec in models.split(","):
        name, _, dtype = spec.partition(":")
        if not hasattr(torch, dtype or "?"):
            raise SystemExit(f"--models: {spec!r} is not model:dtype (e.g. smollm2:bfloat16)")
        t = time.perf_counter()
        model = torch_model(load_config(name), getattr(torch, dtype), "cpu", init="empty")
        source, program, info = lower_program(model, name, quantize)
        folder = folder_name(name, dtype, quantize)
        save_artefact(out / folder, model, source, program, info)
        report[folder] = {**info, "total_s": time.perf_counter() - t}
        log("lower", f"{folder}: {report[folder]}")
        del model, program
    return report


def main(args) -> int:
    quantize = parse_quantize_spec(args.quantize, "--quantize")
    print(json.dumps(lower(args.models, Path(args.out), quantize), default=str))
    return 0
