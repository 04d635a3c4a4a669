"""Correctness of the lowered model on MLX's device against transformers on the CPU, same weights.

Two sequences (40 and 17 tokens) prefilled together, then 3 decode steps each (teacher-forced): every
step's last-token logits, 8 rows, 6 of them through the decode kernels on a CUDA GPU. Tolerance relative to
the largest logit: 1e-4 in float32 (MLX_ENABLE_TF32=0, which `import runtime` sets), 2e-2 in bfloat16.
The step is captured here, or read from an artefact folder (`gpu.py lower`) where the model is there.
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
from gpu_lower import lower_program
from gpu_systems import Artefact, Ours, mlx_setup, with_derived
from gpu_workloads import load_config, torch_model

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def _from_artefact(artefact: Artefact, model) -> tuple[dict, str]:
    """The torch weights the artefact's step reads, from `model`'s parameters and the stored constants."""
    state = dict(model.named_parameters(remove_duplicate=False))
    weights = {p: state[p] for p in artefact.meta["params"]}
    constants = load_file(str(artefact.folder / "constants.safetensors"))
    weights.update({p: constants[p] for p in artefact.meta["constants"]})
    return with_derived(weights, artefact.meta, torch.cat), f"artefact {artefact.folder} (torch {artefact.meta.get('torch')})"


def check(name: str, dtype_name: str, device: str, artefacts: Path | None = None) -> dict:
    mlx_setup(device)
    cfg = load_config(name)
    model = torch_model(cfg, getattr(torch, dtype_name), "cpu", init="seed", seed=0)
    t = time.perf_counter()
    if artefacts is not None and (Path(artefacts) / f"{name}-{dtype_name}" / "meta.json").is_file():
        artefact = Artefact(artefacts, name, dtype_name)
        weights, how = _from_artefact(artefact, model)
        source, layers = artefact.source, artefact.layers
    else:
        source, program, _ = lower_program(model, name)
        weights = {program.weight_paths[k]: v for k, v in program.weights.items()}
        layers = [asdict(x) for x in program.attention]
        how = f"captured here (torch {torch.__version__})"
    lower_s = time.perf_counter() - t
    mx_dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[dtype_name]
    mweights = {p: mx.array(v.detach().to(torch.int32) if v.dtype == torch.int64 else v.detach().contiguous())
                for p, v in weights.items()}
    ours = Ours(source, layers, mweights, mx_dtype, num_blocks=32)

    rng = np.random.default_rng(0)
    lens, steps = {1: 40, 2: 17}, 3
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
    return {"model": name, "dtype": dtype_name, "device": str(mx.default_device()), "lowering": how,
            "lower_s": lower_s, "max_abs_err": err, "max_abs_logit": scale, "rel_err": err / scale,
            "tolerance_rel": tol, "ok": bool(err / scale <= tol), "rows_compared": 2 * (steps + 1),
            "tf32": os.environ.get("MLX_ENABLE_TF32", "default(1)"), "vllm_imported": "vllm" in sys.modules}


def main(args) -> int:
    out = check(args.model, args.dtype, args.device, Path(args.artefacts))
    log("check", json.dumps(out))
    res = ResultsFile(args.out, "checks", f"{args.model} {args.dtype}")
    res.add(**out)
    print(json.dumps(out))
    return 0 if out["ok"] else 1
