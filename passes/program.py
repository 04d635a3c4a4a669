"""The object every pass rewrites: one FX graph of a model's whole step, plus the tensors it reads.

`gm.graph` placeholders are of two kinds: weights (parameters, buffers, constants added by passes),
whose tensors live in `weights` and whose module paths live in `weight_paths`; and the step's runtime
inputs, listed in `inputs` (token ids, positions, which rows need logits). Attention layers are
described in `attention` so that the attention pass and the runtime agree on their shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer as the model declares it (vLLM's Attention module or an HF config)."""

    index: int
    name: str  # module path, e.g. "model.layers.3.self_attn.attn"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int = -1  # <= 0: none
    logit_cap: float = 0.0  # <= 0: none
    cache_planes: int = 2  # K and V; 1: a latent cache (multi-head latent attention), head_dim its row width
    sinks: str = ""  # module path of the per-head sink logits (attention sinks); "": none


@dataclass
class Program:
    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]
    weight_paths: dict[str, str]
    inputs: list[str]
    attention: list[AttentionLayer]
    meta: dict = field(default_factory=dict)
    # weights a pass built from the model's own (by module path): path -> {"cat": [source paths], "dim": d}.
    # A cached artefact rebuilds them from the model's state instead of storing a copy on disk.
    derived: dict[str, dict] = field(default_factory=dict)
    # float32 originals of weights the model holds rounded to its dtype, by module path (vLLM's bf16 RoPE
    # cos/sin caches): passes that read values off weights (passes/rope.py) read these instead.
    float32_sources: dict[str, torch.Tensor] = field(default_factory=dict)
    # weights held in MLX's affine format, by module path (passes.fused.quantized.Quantized): the quantize pass
    # makes their readers quantized ops
    quantized: dict[str, object] = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def add_constant(self, name: str, value: torch.Tensor) -> fx.Node:
        """A weight placeholder holding `value` (e.g. RoPE frequencies a pass derived); equal
        constants are shared, so 30 layers with the same frequencies read one array."""
        for node in self.graph.nodes:
            have = self.weights.get(node.name) if node.op == "placeholder" else None
            if have is not None and node.name.startswith(name.split("_")[0]) and have.shape == value.shape \
                    and have.dtype == value.dtype and torch.equal(have, value):
                return node
        return self.add_weight(self._free_name(name), value)

    def add_weight(self, path: str, value: torch.Tensor, near: str | None = None) -> fx.Node:
        """A weight placeholder at module path `path` holding `value`, placed where the weight at path `near`
        is (graph text stays in model order), or first."""
        name = self._free_name(re.sub(r"\W", "_", path))
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        where = next((n for n in placeholders if self.weight_paths.get(n.name) == near), placeholders[0])
        with self.graph.inserting_before(where):
            node = self.graph.placeholder(name)
        node.meta["val"] = _fake_like(value, self.graph)
        self.weights[node.name] = value
        self.weight_paths[node.name] = path
        return node

    def add_derived(self, path: str, value: torch.Tensor, sources: list[str], dim: int = 0) -> fx.Node:
        """A weight placeholder at module path `path` holding `value` = the weights at `sources` (module paths)
        concatenated along `dim`, made once here; the recipe goes in `derived`."""
        node = self.add_weight(path, value, near=sources[0])
        self.derived[path] = {"cat": list(sources), "dim": dim}
        return node

    def _free_name(self, base: str) -> str:
        """`base`, or `base_2`, `base_3`, ... : the first no weight has."""
        name, n = base, 1
        while name in self.weights:
            n += 1
            name = f"{base}_{n}"
        return name

    def node_count(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "call_function")


def module_path(node: fx.Node) -> str:
    """The innermost module path a node came from, normalised to dotted form."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"L\['self'\]\.?|L\['fn'\]\.?", "", path)
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = path.strip(".").removeprefix("model.")  # the capture wrapper's attribute
    return "" if path.startswith("_") else path


def source_line(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)', trace)
    if not frames:
        return ""
    file, line, fn, code = frames[-1]
    return f"{Path(file).name}:{line} in {fn}: {code.strip()}"


def exported_weights(ep, module: torch.nn.Module, strip: str = "") -> tuple[dict, dict]:
    """(placeholder -> tensor, placeholder -> module path) for the parameters, buffers and constants
    that `torch.export` lifted to inputs of `ep` (exported from `module`); `strip` drops a wrapper prefix."""
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(dict(module.named_buffers(remove_duplicate=False)))
    state.update(getattr(ep, "constants", {}) or {})
    weights, paths = {}, {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None:
            weights[spec.arg.name] = state[spec.target].detach()
            paths[spec.arg.name] = spec.target.removeprefix(strip)
    return weights, paths


def value_of(node):
    """The fake value (shape and dtype) torch.export recorded for a node, or None for anything else."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def fake_mode_of(graph: fx.Graph):
    """The FakeTensorMode of the graph's shape metadata (found once, then remembered on the graph)."""
    mode = getattr(graph, "_fake_mode", None)
    if mode is None:
        from torch._guards import detect_fake_mode

        for node in graph.nodes:  # the first fake value tells the mode
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                mode = detect_fake_mode([val])
                if mode is not None:
                    break
        graph._fake_mode = mode
    return mode


def _fake_like(value: torch.Tensor, graph: fx.Graph):
    mode = fake_mode_of(graph)
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value


def run_in_torch(program: Program, **inputs: torch.Tensor):
    """Execute the (possibly rewritten) graph eagerly in torch: the reference for pass tests."""
    args = []
    for node in program.graph.nodes:
        if node.op == "placeholder":
            args.append(program.weights[node.name] if node.name in program.weights else inputs[node.name])
    with torch.no_grad():
        return fx.Interpreter(program.gm).run(*args)
