"""The Hugging Face front's unit batch axis, dropped: `[1, T, H]` activations become `[T, H]`.

A transformers model runs on `input_ids[None]`, so every activation of the captured step carries a
leading axis of size 1 (vLLM's models work on `[T, H]` already). MLX pays for it at every linear:
its matmul flattens a 3-D input to 2-D and unflattens the result, two graph nodes a linear, and the
column slices and reshapes around attention add more. Each node costs host time in every step (on
MLX-CUDA in particular), and a 32-layer step has hundreds.

The pass starts at `unsqueeze(x, 0)` and carries the squeezed value forward through the ops that
work row by row (linears, norms, the fused ops, elementwise ops whose other operands broadcast the
same without the axis), shifting slice dims and dropping the leading 1 of reshapes; `select(x, 0, 0)`
(the front's `last_hidden_state[0]`) is the squeezed value itself. Any other op that reads a squeezed
value gets the axis back (an `unsqueeze` before it), so the graph computes exactly what it did.
A cleanup then removes the reshapes that became the identity. A graph with no leading unit axis
(vLLM's front) is left as it is.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes.cleanup import canonicalize
from passes.program import Program, fake_mode_of, value_of as _val

aten = torch.ops.aten
mlx = torch.ops.mlx
NAME = "squeeze_batch"

# ops whose every output row depends on the same input row: their leading axis is free
_ROWWISE = {aten.linear.default, aten.embedding.default, mlx.rms_norm.default, mlx.add_rms_norm.default,
            mlx.silu_mul.default, mlx.gelu_mul.default, mlx.quantized_linear.default}
_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
                aten.div.Scalar, aten.sub.Scalar, aten.neg.default, aten.tanh.default, aten.silu.default,
                aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.exp.default, aten.rsqrt.default,
                aten.pow.Tensor_Scalar, aten._to_copy.default, aten.to.dtype}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_TABLES = {aten.embedding.default: 1, mlx.quantized_embedding.default: 3}  # lookups: which argument the indices are


def _ndim(node) -> int:
    val = _val(node)
    return val.dim() if isinstance(val, torch.Tensor) else 0


def _is_root(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target == aten.unsqueeze.default and node.args[1] == 0


class _Squeezer:
    """Walks the graph once in order. `squeezed[n]` is a node holding n's value without axis 0: a
    root's input, or n itself once n is rewritten (then n's full value no longer exists)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.mode = fake_mode_of(graph)
        self.squeezed: dict[fx.Node, fx.Node] = {}
        self.rank: dict[fx.Node, int] = {}  # ndim of the full (unsqueezed) value
        self.selects: dict[fx.Node, fx.Node] = {}  # x[0] -> the squeezed x

    def visit(self, node: fx.Node) -> None:
        if _is_root(node) and node.args[0] not in self.squeezed:
            self.squeezed[node], self.rank[node] = node.args[0], _ndim(node)
        elif node.op == "call_function" and self._rewrite(node):
            pass
        else:
            self._restore(node)

    def _squeeze(self, node: fx.Node) -> None:
        """`node` now computes its old value without the leading axis: its shape metadata follows."""
        def drop(v):
            if not isinstance(v, torch.Tensor):
                return v
            if not (v.dim() > 0 and isinstance(v.shape[0], int) and v.shape[0] == 1):
                raise ValueError(f"squeeze_batch: {node} has no leading axis of size 1 to drop: {v.shape}")
            return v[0]

        val = node.meta["val"]
        self.rank[node] = max((v.dim() for v in val if isinstance(v, torch.Tensor)), default=0) \
            if isinstance(val, (tuple, list)) else val.dim()
        with self.mode:
            node.meta["val"] = type(val)(drop(v) for v in val) if isinstance(val, (tuple, list)) else drop(val)
        self.squeezed[node] = node

    def _arg(self, a):
        return self.squeezed.get(a, a) if isinstance(a, fx.Node) else a

    def _restore(self, node: fx.Node) -> None:
        """An op that needs the axis reads `unsqueeze(x, 0)` for each input x rewritten in place (a
        root's input is left alone: the root itself still computes the full value)."""
        for old in [a for a in node.all_input_nodes if self.squeezed.get(a) is a]:
            with self.graph.inserting_before(node):
                back = self.graph.call_function(aten.unsqueeze.default, (old, 0))
            with self.mode:
                back.meta["val"] = _val(old).unsqueeze(0)
            node.replace_input_with(old, back)

    def _rewrite(self, node: fx.Node) -> bool:
        t, args = node.target, node.args
        if t in _RESHAPES:
            return self._reshape(node)
        inputs = [a for a in node.all_input_nodes if a in self.squeezed]
        if not inputs:
            return False
        if t == operator.getitem and isinstance(_val(args[0]), (tuple, list)):
            node.args = (self._arg(args[0]), args[1])
            self._squeeze(node)
            return True
        if t in (aten.select.int, aten.slice.Tensor) and inputs == [args[0]]:
            if args[1] == 0 and t == aten.select.int and args[2] == 0:
                self.selects[node] = self.squeezed[args[0]]  # x[0] is the squeezed value (swapped in at the end)
                return True
            if args[1] == 0 or (args[1] < 0 and -args[1] >= self.rank[args[0]]):
                return False  # indexes the axis itself
            node.args = (self._arg(args[0]), args[1] - 1 if args[1] > 0 else args[1], *args[2:])
            self._squeeze(node)
            return True
        if t in _TABLES:  # rows of a table at squeezed indices
            at = _TABLES[t]
            if args[at] not in self.squeezed or any(a in self.squeezed for a in args[:at]):
                return False
            node.args = (*args[:at], self._arg(args[at]), *args[at + 1:])
            self._squeeze(node)
            return True
        if t in _ROWWISE or t in _ELEMENTWISE:
            full = max(self.rank[a] for a in inputs)
            tensors = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
            # every operand is squeezed or broadcasts from fewer dims than the output has (weights, scales)
            if not all(a in self.squeezed or _ndim(a) < full for a in tensors):
                return False
            node.args = fx.node.map_arg(node.args, self._arg)
            self._squeeze(node)
            return True
        return False

    def _reshape(self, node: fx.Node) -> bool:
        """reshape(x, [1, *rest]) -> reshape(x', rest), squeezed; reshape(x', shape) for a squeezed x and
        any other shape (x' has x's elements in x's order). An x that is not squeezed (attention's output
        going back to [1, T, H * D]) is taken only when an op that can go without the axis reads it."""
        shape, source = list(node.args[1]), node.args[0]
        leading_one = len(shape) > 1 and isinstance(shape[0], int) and shape[0] == 1
        if source not in self.squeezed and not (leading_one and any(u.target in _ROWWISE | _ELEMENTWISE
                                                                    for u in node.users)):
            return False
        node.args = (self._arg(source), shape[1:] if leading_one else shape)
        if leading_one:
            self._squeeze(node)
        return True


def squeeze_batch(program: Program) -> int:
    """Returns how many unit-axis roots the graph no longer reads."""
    graph = program.graph
    roots = [n for n in graph.nodes if _is_root(n)]
    if not roots or fake_mode_of(graph) is None:
        return 0
    squeezer = _Squeezer(graph)
    for node in list(graph.nodes):
        squeezer.visit(node)
    for select, value in squeezer.selects.items():
        select.replace_all_uses_with(value)
    graph.eliminate_dead_code()
    canonicalize(graph)  # the reshapes to [T, W] of values that are [T, W] now
    alive = set(graph.nodes)
    return sum(1 for r in roots if r not in alive or not r.users)
