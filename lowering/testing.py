"""The pass-developer harness: check a pass on a torch function in a few lines.

    from lowering.testing import check_pass
    from passes.fused.rms_norm import PASS

    def norm(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight

    check_pass(PASS, norm, lambda dtype, size: (torch.randn(size, 64, dtype=dtype), torch.randn(64, dtype=dtype)),
               expect_matched=1, ops_before={"rsqrt"}, ops_absent_after={"rsqrt", "pow"},
               ops_after={"mlx.rms_norm"}, dtypes=(torch.float32, torch.bfloat16), sizes=(1, 7, 64))

For each dtype it captures `fn` through torch.export exactly as models are captured (ATen IR, the size
dimension symbolic: dims that change with `size` are found by calling `make` twice), runs the cleanup
pass (as the default pipeline does) and then the pass under test, and checks:
  - the matched count, ops present before the pass and absent (or present) after it (dead code
    removed, as the pipeline's final cleanup does);
  - the rewritten graph run in torch (`run_in_torch`) vs `fn` run eagerly;
  - the graph lowered to MLX (emit + load_step, not jitted) vs `fn` run eagerly;
over every size in `sizes` (a list, or a hypothesis strategy: see `strategies`), all through the ONE
graph captured per dtype. On failure the AssertionError names dtype, size and stage, gives the max
errors and the graph diff of the pass. The returned `PassCheck` holds all of it for further asserts.

Op names are those of `Lowered.op_histogram()` and `lower-model`'s op table: `aten.` and `.default`
dropped (`rsqrt`, `pow.Tensor_Scalar`, `mlx.rms_norm`); a name without an overload (`pow`) matches every
overload.
"""

from __future__ import annotations

import difflib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import mlx.core as mx
import numpy as np
import torch
import torch.fx as fx

from lowering.api import mlx_weights
from lowering.compile import load_step
from passes import cleanup as _cleanup_pass
from passes.manager import FunctionPass, PassManager, PassResult, PatternPass
from passes.pattern import Pattern
from passes.program import Program, exported_weights, module_path, run_in_torch

# (atol, rtol): |got - ref| <= atol + rtol * |ref|, elementwise.
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "bool", torch.float64: "f64", torch.int8: "i8", torch.uint8: "u8"}


# -- graph text (shared with lower-model's --stage / --diff) --------------------------------------
def op_name(target) -> str:
    return str(getattr(target, "__name__", target) if not isinstance(target, torch._ops.OpOverload)
               else target).removeprefix("aten.").removesuffix(".default")


def op_histogram(graph: fx.Graph) -> dict[str, int]:
    counts = Counter(op_name(n.target) for n in graph.nodes if n.op == "call_function")
    return dict(counts.most_common())


def describe_value(val) -> str:
    if isinstance(val, torch.Tensor):
        dims = ", ".join(str(d) for d in val.shape)
        return f"{_SHORT.get(val.dtype, str(val.dtype).removeprefix('torch.'))}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(describe_value(v) for v in val) + ")"
    return type(val).__name__ if val is not None else ""


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return _SHORT.get(a, str(a))
    return repr(a)


def graph_text(program: Program | fx.Graph) -> str:
    """One line per node: `%name = op(args) : dtype[shape]  # module path`. Names are FX's, stable
    across passes, so two snapshots diff cleanly."""
    graph = program.graph if isinstance(program, Program) else program
    weights = program.weight_paths if isinstance(program, Program) else {}
    lines = []
    for n in graph.nodes:
        shape = describe_value(n.meta.get("val"))
        if n.op == "placeholder":
            kind = f'weight "{weights[n.name]}"' if n.name in weights else "input"
            lines.append(f"%{n.name} = {kind} : {shape}")
        elif n.op == "output":
            lines.append(f"return {_arg(n.args[0])}")
        else:
            args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
            where = module_path(n)
            fused = n.meta.get("fused_from")
            note = "  # " + ", ".join(x for x in (where, f"fused: {fused}" if fused else "") if x) \
                if where or fused else ""
            lines.append(f"%{n.name} = {op_name(n.target)}({', '.join(args)}) : {shape}{note}")
    return "\n".join(lines) + "\n"


def graph_diff(before: str, after: str, name: str = "pass", context: int = 2) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True),
                                        f"before {name}", f"after {name}", n=context))


# -- capture of a plain torch function or module ------------------------------------------------
class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn


def _wrap(fn: Callable) -> torch.nn.Module:
    """A module whose forward has fn's parameter names: export names the placeholders after them
    (passes may look inputs up by name, e.g. RoPE reads `positions`)."""
    if isinstance(fn, torch.nn.Module):
        return fn
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    ns: dict = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.fn({', '.join(names)})", ns)
    cls = type("Captured", (_Fn,), {"forward": ns["forward"]})
    return cls(fn)


def input_names(fn: Callable) -> list[str]:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    return [p.name for p in inspect.signature(target).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def dynamic_dims(args: tuple, other: tuple) -> tuple:
    """dynamic_shapes for export: dims whose sizes differ between two example calls become symbolic
    (dims that change together share one symbol)."""
    dims: dict[tuple[int, int], Any] = {}
    spec = []
    for a, b in zip(args, other):
        if not isinstance(a, torch.Tensor):
            spec.append(None)
            continue
        entry = {}
        for i, (x, y) in enumerate(zip(a.shape, b.shape)):
            if x != y:
                if (x, y) not in dims:
                    dims[(x, y)] = torch.export.Dim(f"size{len(dims) or ''}", min=1, max=1 << 16)
                entry[i] = dims[(x, y)]
        spec.append(entry or None)
    return tuple(spec)


def capture(fn: Callable, args: tuple, dynamic_shapes: tuple | None = None, name: str = "fn") -> Program:
    """A Program from a torch function or module, through torch.export like `lowering.capture`:
    module parameters and buffers become weights (by module path), the arguments become inputs."""
    module = _wrap(fn)
    with torch.no_grad():
        ep = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    weights, paths = exported_weights(ep, module)
    gm = ep.graph_module
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name not in weights]
    return Program(gm, weights, paths, inputs, [], {"model": name, "front": "function"})


# -- the check ----------------------------------------------------------------------------------
@dataclass
class Case:
    dtype: torch.dtype
    size: int
    max_abs_ref: float
    torch_err: float  # rewritten graph in torch vs fn eager
    mlx_err: float | None  # lowered MLX vs fn eager (None: not run)

    def __str__(self) -> str:
        mlx = "-" if self.mlx_err is None else f"{self.mlx_err:.3g}"
        return (f"{_SHORT.get(self.dtype, self.dtype)} size={self.size}: max|ref| {self.max_abs_ref:.3g}, "
                f"max abs err torch {self.torch_err:.3g}, mlx {mlx}")


@dataclass
class PassCheck:
    """What check_pass saw, per dtype: pass results, graphs before/after, emitted source, cases."""

    name: str
    results: dict = field(default_factory=dict)  # dtype -> PassResult of the pass under test
    before: dict = field(default_factory=dict)  # dtype -> graph text before the pass
    after: dict = field(default_factory=dict)  # dtype -> graph text after it
    sources: dict = field(default_factory=dict)  # dtype -> emitted MLX source
    cases: list[Case] = field(default_factory=list)

    def diff(self, dtype: torch.dtype = torch.float32) -> str:
        return graph_diff(self.before[dtype], self.after[dtype], self.name)

    def summary(self) -> str:
        lines = [f"pass {self.name}:"]
        for dt, r in self.results.items():
            lines.append(f"  {_SHORT.get(dt, dt)}: matched {r.matched}, nodes {r.nodes_before} -> {r.nodes_after}")
        lines += [f"  {c}" for c in self.cases]
        return "\n".join(lines)


LAST: list[PassCheck] = []  # checks run in this test (the pytest plugin prints them on failure)


def as_pass(p) -> Any:
    if isinstance(p, Pattern):
        return PatternPass(p.name, [p])
    if callable(p) and not hasattr(p, "run"):
        return FunctionPass(getattr(p, "__name__", "pass"), p)
    return p


def _has(ops: Iterable[str], name: str) -> bool:
    return any(op == name or op.startswith(name + ".") for op in ops)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _compare(got: list, ref: list, dtype, atol, rtol) -> tuple[float, float, str | None]:
    err = top = 0.0
    problem = None
    if len(got) != len(ref):
        return float("inf"), 0.0, f"{len(got)} outputs, expected {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        g, r = g.detach().float(), r.detach().float()
        if tuple(g.shape) != tuple(r.shape):
            return float("inf"), 0.0, f"output {i} has shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        diff = (g - r).abs()
        err, top = max(err, float(diff.max())), max(top, float(r.abs().max()))
        bad = diff > atol + rtol * r.abs()
        if bool(bad.any()) or not bool(torch.isfinite(g).all() == torch.isfinite(r).all()):
            problem = problem or f"output {i}: {int(bad.sum())} of {r.numel()} elements out of tolerance"
    return err, top, problem


def _mlx_run(program: Program, source: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    step = load_step(source, jit=False)
    args = []
    for name in program.inputs:
        t = inputs[name]
        args.append(mx.array(t.to(torch.int32) if t.dtype == torch.int64 else t.contiguous()))
    out, _ = step(step.prepare(mlx_weights(program)), [], {}, *args)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    mx.eval(outs)
    return [torch.from_numpy(np.array(o.astype(mx.float32) if mx.issubdtype(o.dtype, mx.floating) else o))
            for o in outs]


def check_pass(
    pass_,
    fn: Callable,
    make: Callable[..., tuple] | tuple,
    *,
    expect_matched: int | None = None,
    ops_before: Iterable[str] = (),
    ops_absent_after: Iterable[str] = (),
    ops_after: Iterable[str] = (),
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    sizes=(8,),
    example_size: int = 8,
    pre: Iterable = ("cleanup",),
    mlx: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    max_examples: int = 20,
    verbose: bool = True,
) -> PassCheck:
    """Check `pass_` (a Pass, PatternPass, Pattern or function of a Program) on `fn`.

    make(dtype, size) -> the positional arguments of fn (or a fixed tuple of tensors: floating ones
    are cast to each dtype, and `sizes` is ignored). `sizes`: the sizes checked, a sequence or a
    hypothesis strategy of ints (then `max_examples` draws of size and seed). `pre`: passes run first
    ("cleanup" = the default pipeline's first pass). Returns the PassCheck; raises AssertionError.
    """
    under_test = as_pass(pass_)
    pre_passes = [_cleanup_pass if p == "cleanup" else as_pass(p) for p in pre]
    if not callable(make):
        fixed = tuple(make)
        make = lambda dtype, size: tuple(  # noqa: E731
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in fixed)
        sizes, example_size = (example_size,), example_size
    names = input_names(fn)
    report = PassCheck(under_test.name)
    LAST.append(report)

    def fail(msg: str, dtype) -> None:
        parts = [msg, report.summary()]
        if dtype in report.after:
            parts.append("graph diff of the pass:\n" + (report.diff(dtype) or "(no change)"))
        raise AssertionError("\n".join(parts))

    for dtype in dtypes:
        a_tol, r_tol = TOLERANCES.get(dtype, (1e-5, 1.3e-6))
        a_tol, r_tol = (atol if atol is not None else a_tol), (rtol if rtol is not None else r_tol)
        torch.manual_seed(seed)
        example = make(dtype, example_size)
        other = make(dtype, example_size + 5)
        program = capture(fn, example, dynamic_dims(example, other), name=getattr(fn, "__name__", "fn"))
        PassManager(pre_passes).run(program) if pre_passes else None
        report.before[dtype] = graph_text(program)
        (result,) = PassManager([under_test]).run(program)
        report.results[dtype] = result
        program.graph.eliminate_dead_code()  # as the pipeline's final cleanup does
        program.gm.recompile()
        report.after[dtype] = graph_text(program)
        label = _SHORT.get(dtype, str(dtype))
        if expect_matched is not None and result.matched != expect_matched:
            fail(f"[{label}] {under_test.name} matched {result.matched}, expected {expect_matched}", dtype)
        before_ops = _ops_of(report.before[dtype])
        after_ops = set(op_histogram(program.graph))
        for op in ops_before:
            if not _has(before_ops, op):
                fail(f"[{label}] {op} is not in the graph before the pass (ops: {sorted(before_ops)})", dtype)
        for op in ops_absent_after:
            if _has(after_ops, op):
                fail(f"[{label}] {op} is still in the graph after the pass (ops: {sorted(after_ops)})", dtype)
        for op in ops_after:
            if not _has(after_ops, op):
                fail(f"[{label}] {op} is not in the graph after the pass (ops: {sorted(after_ops)})", dtype)
        if mlx:
            from lowering.emit import emit_source

            report.sources[dtype] = emit_source(program)

        def one(size: int, case_seed: int) -> None:
            torch.manual_seed(case_seed)
            args = make(dtype, size)
            with torch.no_grad():
                ref = _flat(fn(*args))
            inputs = dict(zip(names, args))
            got = _flat(run_in_torch(program, **inputs))
            t_err, top, problem = _compare(got, ref, dtype, a_tol, r_tol)
            case = Case(dtype, size, top, t_err, None)
            report.cases.append(case)
            if verbose and not mlx:
                print(f"[pass harness] {under_test.name} {case}")
            if problem:
                fail(f"[{label} size={size}] rewritten graph (torch) differs from the original: {problem}; "
                     f"max abs err {t_err:.3g} (atol {a_tol}, rtol {r_tol})", dtype)
            if mlx:
                m_got = _mlx_run(program, report.sources[dtype], inputs)
                case.mlx_err, _, problem = _compare(m_got, ref, dtype, a_tol, r_tol)
                if verbose:
                    print(f"[pass harness] {under_test.name} {case}")
                if problem:
                    fail(f"[{label} size={size}] lowered MLX differs from torch: {problem}; max abs err "
                         f"{case.mlx_err:.3g} (atol {a_tol}, rtol {r_tol})\nMLX source:\n{report.sources[dtype]}",
                         dtype)

        if _is_strategy(sizes):
            from hypothesis import given, settings
            from hypothesis import strategies as st

            @settings(max_examples=max_examples, deadline=None, database=None)
            @given(size=sizes, case_seed=st.integers(0, 2**31 - 1))
            def run(size, case_seed):
                one(size, case_seed)

            run()
        else:
            for i, size in enumerate(sizes):
                one(size, seed + 1 + i)
    return report


def _ops_of(text: str) -> set[str]:
    ops = set()
    for line in text.splitlines():
        if line.startswith("%") and " = " in line and "(" in line:
            rhs = line.split(" = ", 1)[1]
            if not rhs.startswith(("weight ", "input ")):
                ops.add(rhs.split("(", 1)[0])
    return ops


def _is_strategy(x) -> bool:
    try:
        from hypothesis.strategies import SearchStrategy
    except ImportError:
        return False
    return isinstance(x, SearchStrategy)


class strategies:  # noqa: N801  (a namespace: lowering.testing.strategies.sizes(...))
    """Hypothesis strategies for `check_pass(..., sizes=...)` and for your own @given tests."""

    @staticmethod
    def sizes(min_size: int = 1, max_size: int = 64):
        from hypothesis import strategies as st

        return st.integers(min_size, max_size)

    @staticmethod
    def dtypes(*choices: torch.dtype):
        from hypothesis import strategies as st

        return st.sampled_from(choices or (torch.float32, torch.bfloat16, torch.float16))

    @staticmethod
    def tensors(shape, dtype=torch.float32, scale: float = 1.0):
        """Random tensors of `shape` (a tuple, ints or strategies), drawn from a seed."""
        from hypothesis import strategies as st

        dims = [d if not isinstance(d, int) else st.just(d) for d in shape]

        @st.composite
        def build(draw):
            size = [draw(d) for d in dims]
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
            return (torch.randn(size, generator=gen) * scale).to(dtype)

        return build()
