"""The lowering pipeline as one call: captured Program -> passes -> MLX source -> compiled step."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import torch

from lowering.compile import cache_key, load_artefact, load_step, store_artefact
from lowering.emit import emit_source
from lowering.quantize import attach, part_paths, parts, quantize_program
from passes import AttentionLayer, PassManager, PassResult, Program, default_manager
from runtime.model import CacheLayout, LoweredModel
from weights import QuantizedWeight
from weights.quantize import QuantizeSpec, quantize_weight


@dataclass
class Lowered:
    program: Program
    source: str
    passes: list[PassResult]
    nodes_captured: int
    timings: dict = field(default_factory=dict)

    def op_histogram(self) -> dict[str, int]:
        """How many times each op (after passes) appears in the final graph."""
        counts = Counter(
            str(n.target).removeprefix("aten.").removesuffix(".default")
            for n in self.program.graph.nodes if n.op == "call_function"
        )
        return dict(counts.most_common())


def run_passes(program: Program, manager: PassManager | None = None, after_pass=None) -> list[PassResult]:
    return (manager or default_manager()).run(program, after_pass)


def lower(program: Program, manager: PassManager | None = None, after_pass=None) -> Lowered:
    """Run the passes and emit source. Raises UnsupportedOpsError listing every op we cannot lower."""
    captured = program.node_count()
    start = time.perf_counter()
    results = run_passes(program, manager, after_pass)
    t_passes = time.perf_counter() - start
    source = emit_source(program)
    t_emit = time.perf_counter() - start - t_passes
    return Lowered(program, source, results, captured, {"passes_s": t_passes, "emit_s": t_emit})


def mlx_weights(program: Program, dtype: torch.dtype | None = None, given: dict[str, mx.array] | None = None
                ) -> dict[str, mx.array]:
    """Weights keyed by module path: `given` ones (MLX arrays by path) as they are, the rest converted once from
    the program's torch tensors (a copy; the caller may drop the torch tensors). Quantized codes (int32 in torch)
    become MLX's uint32."""
    given = given or {}
    out = {}
    for name, tensor in program.weights.items():
        path = program.weight_paths[name]
        if path in given:
            out[path] = given[path]
            continue
        t = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        out[path] = mx.array(_mlx_ready(t))
        if path in program.quantized and out[path].dtype == mx.int32:
            out[path] = out[path].view(mx.uint32)
    return out


def cache_layout(program: Program, block_size: int, dtype: mx.Dtype) -> CacheLayout:
    layers = program.attention
    shapes = {(layer.cache_planes, layer.num_kv_heads, layer.head_dim) for layer in layers}
    if len(shapes) != 1:
        raise NotImplementedError("layers with different KV head counts or head sizes are not supported yet")
    planes, kv_heads, head_dim = shapes.pop()
    return CacheLayout(len(layers), kv_heads, head_dim, block_size, dtype, planes)


def build_model(lowered: Lowered, num_blocks: int, block_size: int = 16, jit: bool = True) -> LoweredModel:
    program = lowered.program
    weights = mlx_weights(program)
    dtype = next((w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)), mx.float32)
    return LoweredModel(load_step(lowered.source, jit=jit), weights, cache_layout(program, block_size, dtype), num_blocks)


def lower_cached(identity: dict, capture, state: dict[str, torch.Tensor], sources: dict | None = None,
                 quantize: QuantizeSpec | None = None):
    """Lower once per model identity; later starts load the verified artefact and skip capture.

    `capture()` returns the Program (only called on a miss); `state` maps module paths to the model's tensors
    (parameters and buffers). `sources` (module path -> mx.array or weights.QuantizedWeight) replaces the
    model's own tensors at those paths: all the weights of a quantized checkpoint. `quantize` quantizes the
    model's other linear and embedding weights at load (one at a time, from `state`). Returns (source, MLX
    weights by path, attention layers, info) where info says whether the cache was hit and how long each part
    took.
    """
    start = time.perf_counter()
    sources = sources or {}
    given = {p: t for p, t in sources.items() if not isinstance(t, QuantizedWeight)}
    key = cache_key(identity)
    hit = load_artefact(key)
    if hit is not None:
        source, meta, constants = hit
        weights = {p: given[p] if p in given else mx.array(_mlx_ready(state[p])) for p in meta["state_paths"]}
        packed = {}
        for p, (bits, group) in meta.get("quantized", {}).items():  # from the checkpoint, or quantized again
            q = sources[p] if p in sources else quantize_weight(mx.array(_mlx_ready(state[p])),
                                                                 QuantizeSpec(bits, group))
            packed.update(parts(p, q))
        merged_from = set()
        for p, recipe in meta.get("derived", {}).items():  # merged projections: rebuilt, not stored
            if all(s in packed for s in recipe["cat"]):  # a quantized one: codes, scales, biases each
                weights[p] = mx.concatenate([packed[s] for s in recipe["cat"]], axis=recipe["dim"])
                merged_from.update(recipe["cat"])
            else:
                weights[p] = mx.array(_mlx_ready(torch.cat([state[s] for s in recipe["cat"]], recipe["dim"])))
        weights.update({p: a for p, a in packed.items() if p not in merged_from})
        weights.update({p: constants[p] for p in meta["constant_paths"]})
        layers = [AttentionLayer(**layer) for layer in meta["layers"]]
        return source, weights, layers, {"cache": "hit", "key": key, "load_s": time.perf_counter() - start}
    program = capture()
    quantized = {p: q for p, q in sources.items() if isinstance(q, QuantizedWeight)}
    if quantize is not None:
        quantized.update(quantize_program(program, quantize, given))
    given = {**given, **attach(program, quantized)}
    lowered = lower(program)
    weights = mlx_weights(program, given=given)
    packed = {part: p for p in quantized for part in part_paths(p)}
    derived = {p: r for p, r in program.derived.items()
               if p in weights and all(s in packed or s in state for s in r["cat"])}
    merged_from = {packed[s] for r in derived.values() for s in r["cat"] if s in packed}
    quantized = {p: [q.bits, q.group_size] for p, q in quantized.items() if p in weights or p in merged_from}
    from_quantized = {part for p in quantized for part in part_paths(p)}
    constant_paths = [p for p in weights if p not in state and p not in derived and p not in from_quantized
                      and p not in given]
    meta = {
        "identity": identity,
        "state_paths": [p for p in weights if p in state and p not in from_quantized],
        "derived": derived,
        "quantized": quantized,
        "constant_paths": constant_paths,
        "layers": [asdict(layer) for layer in program.attention],
        "passes": [asdict(r) for r in lowered.passes],
    }
    store_artefact(key, lowered.source, meta, {p: weights[p] for p in constant_paths})
    info = {"cache": "miss", "key": key, "lower_s": time.perf_counter() - start,
            "capture_s": program.meta.get("capture_s"), "passes": lowered.passes}
    return lowered.source, weights, program.attention, info


def _mlx_ready(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.to(torch.int32) if t.dtype == torch.int64 else t).contiguous()
