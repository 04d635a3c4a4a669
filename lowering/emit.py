"""FX graph -> readable MLX Python source, rendered with a jinja2 template.

Every call_function node becomes one statement `name = <mlx expression>` built by its registered
lowering (lowering/ops). Names come from module paths (`layers_3_self_attn_qkv_proj`), weights are
read from `w` by the keys of the module's WEIGHTS table (the module path; `<path>.T` for a linear's
matrix, a view made once: runtime.model.prepare_weights), and symbolic sizes (the token count) are
taken from input shapes, so one emitted function serves every batch shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
import torch.fx as fx

from lowering.ops import lowering_for
from passes.program import Program, module_path, source_line

_MX_DTYPES = {
    torch.float32: "mx.float32", torch.float16: "mx.float16", torch.bfloat16: "mx.bfloat16",
    torch.int64: "mx.int64", torch.int32: "mx.int32", torch.int16: "mx.int16", torch.int8: "mx.int8",
    torch.uint8: "mx.uint8", torch.bool: "mx.bool_", torch.float64: "mx.float32",
}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
)


def _imported_names(template: str) -> set[str]:
    """The names a template's `import` lines bind (`import mlx.core as mx` -> mx, `from a import b` -> b)."""
    source = (Path(__file__).parent / "templates" / template).read_text()
    names = set()
    for imported in re.findall(r"^(?:from\s+\S+\s+)?import\s+(.+)$", source, re.MULTILINE):
        for part in imported.split(","):  # `name`, `a.b as c`
            name, _, alias = part.strip().partition(" as ")
            names.add(alias.strip() or name.split(".")[0])
    return names


# names the step function's body must not rebind: its parameters, the kernel table and what the template imports
_RESERVED = frozenset({"w", "kv", "batch", "k"} | _imported_names("step.py.j2"))


# vLLM's opaque layer ops (a whole layer behind one custom op, its state in vLLM's own cache) -> what they are
LAYER_OPS = {
    "vllm.mamba_mixer.default": "Mamba state-space layer",
    "vllm.mamba_mixer2.default": "Mamba-2 state-space layer",
    "vllm.short_conv.default": "short-convolution state layer",
    "vllm.linear_attention.default": "linear-attention layer",
    "vllm.qwen_gdn_attention_core.default": "gated delta-net linear-attention layer",
    "vllm.qwen_gdn_attention_core_fused_norm_packed.default": "gated delta-net linear-attention layer",
    "vllm.olmo_hybrid_gdn_full_forward.default": "gated delta-net linear-attention layer",
    "vllm.bailing_v3_kda_attention.default": "delta-attention linear-attention layer",
    "vllm.sparse_attn_indexer.default": "sparse-attention indexer",
}


@dataclass
class Unsupported:
    target: str
    module: str
    source: str

    @property
    def name(self) -> str:
        """The op, with what it is where it is a whole vLLM layer (its per-sequence state is not lowered)."""
        what = LAYER_OPS.get(self.target)
        return f"{self.target} ({what}, per-sequence state cache)" if what else self.target

    def __str__(self) -> str:
        return f"{self.name}  (module {self.module or '?'}; {self.source or 'source unknown'})"


class UnsupportedOpsError(RuntimeError):
    """Raised with EVERY op that has no MLX lowering, before anything is emitted or run."""

    def __init__(self, ops: list[Unsupported]):
        self.ops = ops
        lines = "\n".join(f"  - {op}" for op in ops)
        super().__init__(
            f"{len(ops)} op(s) have no MLX lowering:\n{lines}\n"
            "Add a lowering in lowering/ops/ (see docs/architecture.md) or a pass that rewrites them."
        )

    def targets(self) -> list[str]:
        """The distinct ops, in graph order."""
        return list(dict.fromkeys(op.name for op in self.ops))


def unsupported_ops(program: Program) -> list[Unsupported]:
    seen, found = set(), []
    for node in program.graph.nodes:
        if node.op == "call_function" and lowering_for(node.target) is None:
            key = (str(node.target), module_path(node), source_line(node))
            if key not in seen:
                seen.add(key)
                found.append(Unsupported(*key))
    return found


class Emitter:
    def __init__(self, program: Program):
        self.program = program
        self.names: dict[fx.Node, str] = {}
        self.taken: set[str] = set(_RESERVED)
        self.bound: set[fx.Node] = set()  # values an earlier multi-output statement defines (`bind`)
        self.lines: list[str] = []
        self.symbols: list[tuple[str, str]] = []
        self.weights: dict[str, tuple[str, bool]] = {}  # what the step reads from w: key -> (path, transposed)
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name not in program.weights:
                self.names[node] = node.name
                self.taken.add(node.name)
                val = node.meta.get("val")
                for i, dim in enumerate(getattr(val, "shape", ())):
                    sym = str(dim.node.expr) if isinstance(dim, torch.SymInt) else None
                    if sym and sym.isidentifier() and sym not in dict(self.symbols):
                        self.symbols.append((sym, f"{node.name}.shape[{i}]"))

    # -- rendering helpers used by the op lowerings --------------------------------------------
    def r(self, a) -> str:
        if isinstance(a, fx.Node):
            path = self._weight_path(a)
            if path is not None:
                self.weights[path] = (path, False)
                return f'w["{path}"]'
            return self.names[a]
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(self.r(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return self.dtype(a)
        if isinstance(a, torch.SymInt):
            return str(a.node.expr)
        if isinstance(a, float) and not math.isfinite(a):
            return "float('inf')" if a > 0 else ("-float('inf')" if a < 0 else "float('nan')")
        return repr(a)

    def _weight_path(self, node: fx.Node) -> str | None:
        """The module path of a weight (or pass-derived constant) placeholder; None for anything else."""
        if node.op == "placeholder" and node.name in self.program.weights:
            return self.program.weight_paths[node.name]
        return None

    def transposed(self, weight) -> str:
        """`weight.T`, the right operand of `x @ weight.T`. For a weight it is a view made once when the
        step's weights are prepared (its WEIGHTS table, runtime.model.prepare_weights) rather than a
        transpose node in every step's graph. (Adding x's unit batch axes to that view as well, so that
        MLX's matmul needs no flatten and unflatten around it, costs a copy kernel per layer on MLX-CUDA:
        the compiled SiLU x mul's output keeps its input slice's row stride, which the GEMV copies.)"""
        path = self._weight_path(weight) if isinstance(weight, fx.Node) else None
        if path is None:
            return f"{self.r(weight)}.T"
        self.weights[path + ".T"] = (path, True)
        return f'w["{path}.T"]'

    def dtype(self, dt: torch.dtype) -> str:
        return _MX_DTYPES[dt]

    def shape(self, node: fx.Node) -> str:
        return "(" + "".join(self.r(d) + ", " for d in node.meta["val"].shape) + ")"

    def name(self, node: fx.Node, op: str | None = None) -> str:
        """The node's variable: its module path and op (`op` overrides the op's own name)."""
        if node not in self.names:
            path = module_path(node).removeprefix("model.")
            op = op or getattr(node.target, "__name__", str(node.target)).split(".")[0]
            base = re.sub(r"\W", "_", path) if path else op
            if path and not any(s in op for s in ("linear", "embedding")):
                base = f"{base}_{op.strip('_')}"
            self.names[node] = self._fresh(base)
        return self.names[node]

    def bind(self, node: fx.Node, op: str) -> str:
        """Name a value that the current statement defines with others (`a, b = f(...)`): the walk then
        emits nothing for `node` itself (a getitem of a multi-output op)."""
        self.bound.add(node)
        return self.name(node, op)

    def _fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name

    def line(self, text: str) -> None:
        self.lines.append(text)

    def temp(self, node: fx.Node, suffix: str) -> str:
        """A fresh name for an intermediate value of a multi-statement lowering (`<node>_<suffix>`)."""
        return self._fresh(f"{self.name(node)}_{suffix}")

    # -- the walk ------------------------------------------------------------------------------
    def emit(self, fn_name: str = "step") -> str:
        missing = unsupported_ops(self.program)
        if missing:
            raise UnsupportedOpsError(missing)
        layer = None
        outputs = None
        for node in self.program.graph.nodes:
            if node.op == "output":
                outputs = node.args[0]
                continue
            if node.op != "call_function" or node in self.bound:
                continue
            here = re.match(r"(?:model\.)?layers\.(\d+)", module_path(node))
            if here and here.group(1) != layer:
                layer = here.group(1)
                self.line(f"# layer {layer}")
            fn = lowering_for(node.target)
            expr = fn(self, node, *node.args, **node.kwargs)
            if expr is None:
                continue
            fused = node.meta.get("fused_from")
            self.line(f"{self.name(node)} = {expr}" + (f"  # fused: {fused}" if fused else ""))
        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        rendered = ", ".join(self.r(o) for o in outs)
        return _TEMPLATES.get_template("step.py.j2").render(
            model=self.program.meta.get("model", "a torch model"),
            summary=self.program.meta.get("summary", ""),
            name=fn_name,
            inputs=[n for n in self.program.inputs],
            outputs=rendered if len(outs) == 1 else f"({rendered},)",
            outputs_doc="logits" if len(outs) == 1 else "outputs",
            symbols=self.symbols,
            body=self.lines,
            weights=self.weights,
        )


def emit_source(program: Program, fn_name: str = "step") -> str:
    return Emitter(program).emit(fn_name)
