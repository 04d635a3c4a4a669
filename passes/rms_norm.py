"""RMSNorm -> `mlx.rms_norm` (mx.fast.rms_norm): the decomposed form in every dtype mix, any eps.

Covers the residual-add form too: `add` then norm leaves the add in place and fuses the norm;
a (1 + weight) scale (Gemma) is just another weight expression, folded by cleanup.
"""

import sys

import torch

from passes.manager import PatternPass
from passes.pattern import Pattern

_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]  # (x, weight)


def search(x, weight, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(weight.dtype) * weight


def replace(x, weight, eps, out_dtype):
    return torch.ops.mlx.rms_norm.default(x, weight, eps, out_dtype)


rms_norm = Pattern(
    name="rms_norm",
    search=search,
    replace=replace,
    example_inputs=lambda: [(torch.randn(4, 8, dtype=xd), torch.randn(8, dtype=wd)) for xd, wd in _DTYPES],
    scalars={"eps": float},
    derive=lambda m, program: {"out_dtype": m.anchor.meta["val"].dtype},
)



# vLLM's IR op, as captured when vLLM's "torch wrap" is on (outside the engine, by default).
def _ir_search(x, weight, eps):
    return torch.ops.vllm_ir.rms_norm.default(x, weight, eps, None)


def _ir_patterns() -> list[Pattern]:
    try:
        import vllm.ir.ops  # noqa: F401  (registers torch.ops.vllm_ir.*)
    except ImportError:
        return []
    example = lambda: [(torch.randn(4, 8), torch.randn(8))]  # noqa: E731
    return [Pattern("vllm_ir_rms_norm", _ir_search, replace, example, {"eps": float},
                    derive=lambda m, program: {"out_dtype": m.anchor.meta["val"].dtype})]


def _split_fused_add(program) -> int:
    """vllm_ir.fused_add_rms_norm(x, residual, w, eps) -> (rms_norm(x + residual), x + residual)."""
    from passes.pattern import record

    aten, count = torch.ops.aten, 0
    target = getattr(getattr(torch.ops, "vllm_ir", None), "fused_add_rms_norm", None)
    for node in list(program.graph.nodes):
        if target is None or node.target not in (target.default, getattr(target, "maybe_inplace", None)):
            continue
        x, residual, weight, eps = node.args[:4]
        dtype = x.meta["val"].dtype
        with program.graph.inserting_before(node):
            total = record(program.graph, lambda a, b: aten.add.Tensor(
                aten._to_copy.default(a, dtype=torch.float32), aten._to_copy.default(b, dtype=torch.float32)),
                x, residual)
            normed = record(program.graph, lambda s, w: torch.ops.mlx.rms_norm.default(s, w, eps, dtype), total, weight)
            summed = record(program.graph, lambda s: aten._to_copy.default(s, dtype=dtype), total)
        normed.meta["fused_from"] = "rms_norm"
        normed.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        for user in list(node.users):
            user.replace_all_uses_with(normed if user.args[1] == 0 else summed)
            program.graph.erase_node(user)
        program.graph.erase_node(node)
        count += 1
    return count


class RMSNormPass(PatternPass):
    def run(self, program) -> int:
        from passes.cleanup import canonicalize

        self._add_ir_patterns()
        fused = _split_fused_add(program)
        canonicalize(program.graph)  # same-dtype casts of the split vanish
        return fused + super().run(program)

    def _add_ir_patterns(self) -> None:
        """vLLM's IR pattern joins once vLLM is loaded: only a graph captured from vLLM's model can hold
        its ops, and the HF front end must run (and import nothing of vLLM) where vLLM is absent."""
        if "vllm" in sys.modules and not any(p.name == "vllm_ir_rms_norm" for p in self.patterns):
            self.patterns.extend(_ir_patterns())


PASS = RMSNormPass("rms_norm", [rms_norm], expect=lambda p: p.meta.get("expected_norms"))
