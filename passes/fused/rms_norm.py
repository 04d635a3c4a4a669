"""RMSNorm -> `mlx.rms_norm`, run as `k.rms_norm` (mx.fast.rms_norm): the decomposed form in every dtype mix,
any eps, and vLLM's IR ops.

Covers the residual-add form too: `add` then norm leaves the add in place and fuses the norm (the
add_rms_norm pass takes the pair later); a (1 + weight) scale (Gemma) is just another weight expression,
folded by cleanup. vLLM's model, captured outside its engine, calls its IR ops `vllm_ir.rms_norm` and
`vllm_ir.fused_add_rms_norm`: the `vllm_ir_norms` pass turns them into the same nodes first.
"""

import torch

from passes.cleanup import canonicalize
from passes.fused import FusedOp, declare
from passes.manager import FunctionPass, PatternPass
from passes.pattern import Pattern, record

aten = torch.ops.aten


@torch.library.custom_op("mlx::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMS-normalise the last dim in float32, scale by `weight` (None: a norm without one), return `out_dtype`."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(out_dtype)
    return normed if weight is None else (normed * weight).to(out_dtype)


@rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


OP = declare(FusedOp("rms_norm", torch.ops.mlx.rms_norm.default))

_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]  # (x, weight)


def search(x, weight, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(weight.dtype) * weight


def replace(x, weight, eps, out_dtype):
    return torch.ops.mlx.rms_norm.default(x, weight, eps, out_dtype)


rms_norm_pattern = Pattern(
    name="rms_norm",
    search=search,
    replace=replace,
    example_inputs=lambda: [(torch.randn(4, 8, dtype=xd), torch.randn(8, dtype=wd)) for xd, wd in _DTYPES],
    scalars={"eps": float},
    derive=lambda m, program: {"out_dtype": m.anchor.meta["val"].dtype},
)


def _ir_op(name: str):
    """vLLM's IR op overloads (`torch.ops.vllm_ir.<name>`), none where vLLM's IR is not loaded: only a graph
    captured from vLLM's model can hold them, and the HF front runs (and imports nothing of vLLM) without it."""
    op = getattr(getattr(torch.ops, "vllm_ir", None), name, None)
    return set() if op is None else {getattr(op, o) for o in op.overloads()}


def vllm_ir_norms(program) -> int:
    """vllm_ir.rms_norm(x, w, eps, None) -> mlx.rms_norm; vllm_ir.fused_add_rms_norm(x, residual, w, eps) ->
    (rms_norm(x + residual), x + residual), the sum in float32 as vLLM's reference computes it."""
    graph, count = program.graph, 0
    norms, fused_adds = _ir_op("rms_norm"), _ir_op("fused_add_rms_norm")
    for node in list(graph.nodes):
        if node.target in norms and node.args[3:4] in ((), (None,)):
            x, weight, eps = node.args[:3]
            dtype = node.meta["val"].dtype
            with graph.inserting_before(node):
                new = record(graph, lambda x, w: torch.ops.mlx.rms_norm.default(x, w, eps, dtype), x, weight)
            new.meta.update(fused_from="rms_norm", nn_module_stack=node.meta.get("nn_module_stack", {}))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            count += 1
        elif node.target in fused_adds:
            x, residual, weight, eps = node.args[:4]
            dtype = x.meta["val"].dtype
            with graph.inserting_before(node):
                total = record(graph, lambda a, b: aten.add.Tensor(
                    aten._to_copy.default(a, dtype=torch.float32), aten._to_copy.default(b, dtype=torch.float32)),
                    x, residual)
                normed = record(graph, lambda s, w: torch.ops.mlx.rms_norm.default(s, w, eps, dtype), total, weight)
                summed = record(graph, lambda s: aten._to_copy.default(s, dtype=dtype), total)
            normed.meta.update(fused_from="rms_norm", nn_module_stack=node.meta.get("nn_module_stack", {}))
            for user in list(node.users):
                user.replace_all_uses_with(normed if user.args[1] == 0 else summed)
                graph.erase_node(user)
            graph.erase_node(node)
            count += 1
    if count:
        canonicalize(graph)  # same-dtype casts of the split vanish
    program.meta["vllm_ir_norms"] = count
    return count


def _expected(program) -> int | None:
    """The model's RMSNorm calls, less those vLLM's IR ops already made into `mlx.rms_norm` nodes."""
    norms = program.meta.get("expected_norms")
    return None if norms is None else norms - program.meta.get("vllm_ir_norms", 0)


IR_PASS = FunctionPass("vllm_ir_norms", vllm_ir_norms)
PASS = PatternPass("rms_norm", [rms_norm_pattern], expect=_expected)
