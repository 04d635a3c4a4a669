"""Debug-mode numerical guard (VLLM_METAL_DEBUG=1): find the first value of a step that went non-finite.

Used by the plugin's runner when VLLM_METAL_DEBUG=1 and a step's logits hold NaN/Inf: the step is
run again, eagerly (not compiled), on the same inputs and the KV cache as it was before the step,
with a finiteness check after every assignment in the emitted source. The first name that holds a
NaN/Inf is reported with its layer (the emitter writes `# layer N` before each layer and names
values after their module path), the source line and the weights that line reads.
Debug only: one extra eager step per bad step, every value evaluated.
"""

from __future__ import annotations

import ast
import re
import types
from dataclasses import dataclass

import mlx.core as mx


@dataclass
class NonFinite:
    name: str  # the emitted value's name, e.g. layers_1_mlp_down_proj
    layer: int | None  # from the nearest `# layer N` comment above the line
    line: int
    code: str  # the emitted source line
    weights: list[str]  # weights that line reads (module paths)
    nan: bool
    inf: bool

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "outside the decoder layers"
        kinds = "+".join(k for k, on in (("NaN", self.nan), ("Inf", self.inf)) if on)
        reads = f"; reads {', '.join(self.weights)}" if self.weights else ""
        return f"first non-finite value ({kinds}) is {self.name} in {where} (emitted line {self.line}: {self.code}{reads})"


class _Found(Exception):
    def __init__(self, name: str, line: int, nan: bool, inf: bool):
        self.name, self.line, self.nan, self.inf = name, line, nan, inf


def _check(name: str, line: int, value) -> None:
    for v in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.inexact):
            nan = bool(mx.any(mx.isnan(v)).item())
            inf = bool(mx.any(mx.isinf(v)).item())
            if nan or inf:
                raise _Found(name, line, nan, inf)


def _instrument(source: str, fn_name: str = "step") -> types.CodeType:
    tree = ast.parse(source)
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == fn_name:
            body = []
            for stmt in fn.body:
                body.append(stmt)
                if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], (ast.Name, ast.Tuple)):
                    target = stmt.targets[0]
                    first = target if isinstance(target, ast.Name) else target.elts[0]
                    if isinstance(first, ast.Name):
                        call = ast.parse(f"__nf_check__({first.id!r}, {stmt.lineno}, {first.id})").body[0]
                        body.append(ast.copy_location(call, stmt))
            fn.body = body
    ast.fix_missing_locations(tree)
    return compile(tree, "<lowered step (debug)>", "exec")


def find_non_finite(source: str, args: tuple, fn_name: str = "step", kernels=None) -> NonFinite | None:
    """Run `fn_name(*args)` from `source` eagerly, checking every assigned value; None if all finite.
    `kernels`: the kernel table the step calls (the compiled step's own; default: this process's)."""
    namespace: dict = {"__nf_check__": _check, "__name__": "lowered_step_debug"}
    exec(_instrument(source, fn_name), namespace)
    if kernels is not None:
        namespace["k"] = kernels
    try:
        namespace[fn_name](*args)
    except _Found as found:
        lines = source.splitlines()
        code = lines[found.line - 1].strip() if 0 < found.line <= len(lines) else ""
        code = code.split("  #")[0]
        layer = None
        for text in reversed(lines[: found.line]):
            m = re.match(r"\s*# layer (\d+)\s*$", text)
            if m:
                layer = int(m.group(1))
                break
        weights = re.findall(r'w\["([^"]+)"\]', code)
        return NonFinite(found.name, layer, found.line, code, weights, found.nan, found.inf)
    return None


def locate_in_step(source: str, lowered, batch, kv_before) -> NonFinite | None:
    """Re-run one runtime step eagerly from `kv_before`, with the arguments the compiled step had
    (runtime.model.LoweredModel.step_args: the same device batch, so the same attention path)."""
    return find_non_finite(source, lowered.step_args(batch, kv_before), kernels=lowered.step_fn.kernels)
