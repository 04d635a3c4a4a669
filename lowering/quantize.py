"""Quantized weights into a program: which linears and embeddings read them, in MLX's affine format.

Two ways in, one representation (weights.QuantizedWeight, MLX's affine triple):
- on the fly (`VLLM_METAL_QUANTIZE`, a `QuantizeSpec`): the program's own full-precision linear and embedding
  weights quantized with MLX, one at a time (`quantize_program`);
- from a quantized checkpoint (GGUF, MLX format, AWQ/GPTQ: weights.load): the triples by Hugging Face module
  path, merged the way the model merges its projections (`for_model`: vLLM's `packed_modules_mapping`, e.g.
  q/k/v -> qkv_proj).
`attach` hands them to the program (zero-copy torch views, `Program.quantized`), where the quantize pass
(passes/fused/quantized.py) makes their readers quantized ops, and returns the MLX arrays the step reads.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch

from passes.fused.quantized import Quantized, quantizable
from passes.program import Program
from weights import QuantizedWeight
from weights.quantize import QuantizeSpec, quantize_weight
from weights.quantized import concat_rows

_MX_DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def part_paths(path: str) -> tuple[str, str, str]:
    """Where the step reads a quantized weight at `path` ("P.weight"): its codes at the path itself, as MLX
    checkpoints name them, and "P.scales", "P.biases"."""
    base = path.removesuffix(".weight")
    return path, f"{base}.scales", f"{base}.biases"


def parts(path: str, q: QuantizedWeight) -> dict[str, mx.array]:
    """The MLX arrays of a quantized weight at `path`, by the paths the step reads them at."""
    return dict(zip(part_paths(path), (q.wq, q.scales, q.biases)))


def _torch(a: mx.array) -> torch.Tensor:
    """A zero-copy torch view of an evaluated MLX array (uint32 as int32 of the same bits; bfloat16 through a
    16-bit view)."""
    if a.dtype == mx.uint32:
        return torch.from_numpy(np.asarray(a).view(np.int32))
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.asarray(a.view(mx.uint16))).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(a))


def attach(program: Program, quantized: dict[str, QuantizedWeight]) -> dict[str, mx.array]:
    """Mark `quantized` (weight path -> triple) as the program's quantized weights; returns their MLX arrays by
    the paths the lowered step reads them at."""
    program.quantized.update({path: Quantized(_torch(q.wq), _torch(q.scales), _torch(q.biases), q.bits,
                                              q.group_size) for path, q in quantized.items()})
    arrays = {}
    for path, q in quantized.items():
        arrays.update(parts(path, q))
    return arrays


def quantize_program(program: Program, spec: QuantizeSpec, weights: dict[str, mx.array] | None = None
                     ) -> dict[str, QuantizedWeight]:
    """The program's linear and embedding weights quantized with `spec`, one tensor at a time (from `weights`,
    MLX arrays by path, where given; else from the program's torch tensors)."""
    by_path = {program.weight_paths[n]: t for n, t in program.weights.items()}
    out = {}
    for path in quantizable(program, spec.group_size):
        w = weights[path] if weights is not None and path in weights else mx.array(by_path[path].detach().contiguous())
        out[path] = quantize_weight(w, spec)
    return out


def weight_bytes(program: Program) -> dict:
    """Bytes of the program's weights in full precision (as captured) and as the step reads them, with the
    quantized ones packed (codes + scales + biases): what `lower-model` reports."""
    full = kept = 0
    for name, t in program.weights.items():
        size = t.numel() * t.element_size()
        full += size
        kept += 0 if program.weight_paths[name] in program.quantized else size
    packed = {q.wq.data_ptr(): sum(a.numel() * a.element_size() for a in (q.wq, q.scales, q.biases))
              for q in program.quantized.values()}  # a tied head shares the embedding's arrays: counted once
    return {"full_precision": full, "quantized": kept + sum(packed.values()), "quantized_weights": len(packed)}


def for_model(model: torch.nn.Module, tensors: dict[str, object]) -> tuple[dict[str, QuantizedWeight],
                                                                           dict[str, mx.array], list[str]]:
    """A checkpoint's tensors (Hugging Face module paths -> mx.array or QuantizedWeight) as the torch model's
    parameters and buffers name them: projections the model packs into one (vLLM's `packed_modules_mapping`,
    e.g. qkv_proj <- q_proj, k_proj, v_proj) concatenated by rows. Returns (quantized weights, plain arrays,
    the model's parameter paths the checkpoint does not hold). Plain arrays come in the parameter's dtype."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    quantized, plain, missing = {}, {}, []
    for path, param in model.named_parameters(remove_duplicate=False):
        module, _, leaf = path.rpartition(".")
        parent, _, name = module.rpartition(".")
        sources = [f"{parent}.{p}.{leaf}" if parent else f"{p}.{leaf}" for p in packed.get(name, [])] or [path]
        found = [tensors.get(s) for s in sources]
        if any(f is None for f in found):
            tied = _tied_source(model, path, tensors)
            if tied is None:
                missing.append(path)
                continue
            found = [tied]
        if all(isinstance(f, QuantizedWeight) for f in found):
            q = found[0] if len(found) == 1 else concat_rows(found)
            quantized[path] = for_activations(q, _MX_DTYPES.get(param.dtype, mx.float32))
        elif not any(isinstance(f, QuantizedWeight) for f in found):
            array = found[0] if len(found) == 1 else mx.concatenate(found, axis=0)
            plain[path] = array.astype(_MX_DTYPES.get(param.dtype, array.dtype))
        else:
            raise ValueError(f"{path} packs {', '.join(sources)}, of which only some are quantized: "
                             "a packed projection needs one format for all its parts")
    return quantized, plain, missing


def for_activations(q: QuantizedWeight, dtype: mx.Dtype) -> QuantizedWeight:
    """Scales and biases widened to float32 for a float32 model (exact; MLX dequantizes in their dtype, and a
    GGUF file's float16 block scales times a code do not fit float16); kept as they are otherwise."""
    if dtype != mx.float32 or q.scales.dtype == mx.float32:
        return q
    return QuantizedWeight(q.wq, q.scales.astype(mx.float32), q.biases.astype(mx.float32), q.bits, q.group_size)


def _tied_source(model: torch.nn.Module, path: str, tensors: dict[str, object]):
    """The checkpoint tensor of a parameter the model ties to another (an LM head tied to the embedding)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for other, tensor in params.items():
        if other != path and tensor is params[path] and other in tensors:
            return tensors[other]
    return None
