"""Correctness of the lowered model on MLX's device against transformers on the CPU, same weights.

Two sequences (4,090 and 17 tokens) prefilled together, then 7 decode steps each (teacher-forced), so the
long one reaches position 4,096: every step's last-token logits, 16 rows, 14 of them through the decode
kernels on a CUDA GPU. Tolerance relative to the largest logit: 1e-4 in float32 (MLX_ENABLE_TF32=0, which
the runtime sets, runtime/device.py), 2e-2 in bfloat16. The step is captured here, or read from an artefact folder
(`gpu.py lower`) where the model is there. With a quantization (`--quantize q4:64`), the step reads the
linear and embedding weights in MLX's affine format, quantized on MLX's device by mx.quantize from the
model's own, and transformers holds the dequantized weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from safetensors.torch import load_file

from common import ResultsFile, log
from gpu_lower import folder_name, lower_program, quantized_sources
from gpu_systems import Artefact, Ours, mlx_setup, quantized_parts, with_derived
from gpu_workloads import BLOCK, load_config, torch_model
from runtime.config import QuantizeSpec, parse_quantize_spec

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
LENGTHS, STEPS = {1: 4090, 2: 17}, 7  # the long sequence's last query at position 4,096


def _from_artefact(artefact: Artefact, model) -> tuple[dict, str]:
    """The torch weights the artefact's step reads, from `model`'s parameters and the stored constants."""
    state = dict(model.named_parameters(remove_duplicate=False))
    weights = {p: state[p] for p in artefact.meta["params"]}
    constants = load_file(str(artefact.folder / "constants.safetensors"))
    weights.update({p: constants[p] for p in artefact.meta["constants"]})
    return with_derived(weights, artefact.meta, torch.cat, quantized=False), f"artefact {artefact.folder} (torch {artefact.meta.get('torch')})"


def _quantize_into(model, weights: dict, quantized: dict) -> dict:
    """The quantized weights' MLX arrays (codes, scales, biases: mx.quantize of the model's own weight on MLX's
    device), and the model's weights replaced by their dequantized values (the reference's)."""
    state = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    with torch.no_grad():
        for path, (bits, group) in quantized.items():
            param = state[path]
            wq, scales, biases = mx.quantize(mx.array(param.detach().contiguous()), group_size=group, bits=bits)
            out.update(quantized_parts(path, wq, scales, biases))
            dequantized = mx.dequantize(wq, scales, biases, group_size=group, bits=bits).astype(mx.float32)
            param.copy_(torch.from_numpy(np.array(dequantized)).to(param.dtype))  # tied weights: set once, both see it
            weights.pop(path, None)
    return out


def check(name: str, dtype_name: str, device: str, artefacts: Path | None = None,
          quantize: QuantizeSpec | None = None) -> dict:
    mlx_setup(device)
    cfg = load_config(name)
    model = torch_model(cfg, getattr(torch, dtype_name), "cpu", init="seed", seed=0)
    t = time.perf_counter()
    if artefacts is not None and (Path(artefacts) / folder_name(name, dtype_name, quantize) / "meta.json").is_file():
        artefact = Artefact(artefacts, name, dtype_name, quantize)
        weights, how = _from_artefact(artefact, model)
        source, layers, quantized, meta = artefact.source, artefact.layers, artefact.quantized, artefact.meta
    else:
        source, program, _ = lower_program(model, name, quantize)
        quantized = quantized_sources(program)
        meta = {"derived": program.derived, "quantized": quantized}
        weights = {program.weight_paths[k]: v for k, v in program.weights.items()}  # placeholders where quantized
        layers = [asdict(x) for x in program.attention]
        how = f"captured here (torch {torch.__version__})"
    lower_s = time.perf_counter() - t
    mx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[dtype_name]
    qweights = _quantize_into(model, weights, quantized)
    qweights = with_derived(qweights, meta, mx.concatenate, quantized=True)  # merged ones, from the parts
    mweights = {p: mx.array(v.detach().to(torch.int32) if v.dtype == torch.int64 else v.detach().contiguous())
                for p, v in weights.items() if p not in qweights}
    mweights.update(qweights)
    lens, steps = LENGTHS, STEPS
    blocks = sum(-(-(n + steps + 1) // BLOCK) for n in lens.values()) + 8
    ours = Ours(source, layers, mweights, mx_dtype, num_blocks=blocks)

    rng = np.random.default_rng(0)
    seqs = {s: rng.integers(0, cfg["vocab_size"], size=n + steps).tolist() for s, n in lens.items()}
    for s, toks in seqs.items():
        ours.driver.add(s, toks)
    got = {s: [] for s in seqs}
    work = dict(lens)
    for _ in range(steps + 1):
        rows = np.array(ours.model.step(ours.driver.prepare(work)).astype(mx.float32))
        for i, s in enumerate(work):
            got[s].append(rows[i])
        work = {s: 1 for s in seqs}
    errs, scale = [], 0.0
    with torch.no_grad():
        for s, toks in seqs.items():
            ref = model(input_ids=torch.tensor([toks]), use_cache=False).logits[0].float().numpy()
            want = ref[lens[s] - 1: lens[s] + steps]
            errs.append(float(np.abs(np.stack(got[s]) - want).max()))
            scale = max(scale, float(np.abs(want).max()))
    err = max(errs)
    tol = TOLERANCE[dtype_name]
    return {"model": name, "dtype": dtype_name, "quantized": str(quantize or ""), "device": str(mx.default_device()),
            "lowering": how, "last_position": max(lens.values()) + steps - 1, "quantized_weights": len(quantized),
            "lower_s": lower_s, "max_abs_err": err, "max_abs_logit": scale, "rel_err": err / scale,
            "tolerance_rel": tol, "ok": bool(err / scale <= tol), "rows_compared": 2 * (steps + 1),
            "tf32": os.environ.get("MLX_ENABLE_TF32", "default(1)"), "vllm_imported": "vllm" in sys.modules}


def main(args) -> int:
    quantize = parse_quantize_spec(args.quantize, "--quantize")
    out = check(args.model, args.dtype, args.device, Path(args.artefacts), quantize)
    log("check", json.dumps(out))
    res = ResultsFile(args.out, "checks", f"{args.model} {args.dtype}" + (f" {quantize}" if quantize else ""))
    res.add(**out)
    print(json.dumps(out))
    return 0 if out["ok"] else 1
