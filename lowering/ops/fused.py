"""The fused ops that passes create (passes/fused), all lowered by one rule: a call on the kernel table.

`k.<name>(tensors..., scalar=value, ...)`: the op's tensor arguments positional and the rest by keyword, in
its schema's order. A multi-output op binds its values (`h, normed = k.add_rms_norm(...)`, named like the
ops it replaced); an op on the paged cache takes its layer's cache and the step's batch where its `layer`
argument (its index, or its name among the program's attention layers) stands, and returns the updated cache with
its value (`attn, kv[3] = k.paged_attention(...)`).
What the call does on each device is the kernel table's business (runtime/kernels).
"""

import functools
import operator

import torch

from lowering.ops.registry import register
from passes.fused import FUSED, FusedOp


def is_tensor_argument(arg) -> bool:
    """A schema argument the emitter passes positionally: a tensor, or an optional one."""
    t = arg.type
    return isinstance(t, torch.TensorType) or (isinstance(t, torch.OptionalType)
                                                and isinstance(t.getElementType(), torch.TensorType))


def call(fused: FusedOp, e, node, *args, **kwargs) -> str | None:
    positional, keywords, layer = [], [], None
    schema = fused.op._schema.arguments
    values = list(args) + [kwargs[a.name] for a in schema[len(args):] if a.name in kwargs]
    for arg, value in zip(schema, values):
        if fused.cache and arg.name == "layer":
            if isinstance(value, str):  # the layer by its name: its place among the attention layers
                value = next(a.index for a in e.program.attention if a.name == value)
            layer = value
            positional += [f"kv[{value}]", "batch"]
        elif is_tensor_argument(arg):
            positional.append(e.r(value))
        else:
            keywords.append(f"{arg.name}={e.r(value)}")
    while positional and positional[-1] == "None":  # optional tensors left out (`bias`): the kernel's default
        positional.pop()
    expr = f"k.{fused.name}({', '.join(positional + keywords)})"
    note = f"  # fused: {node.meta['fused_from']}" if node.meta.get("fused_from") else ""
    if fused.cache:
        e.line(f"{e.name(node)}, kv[{layer}] = {expr}{note}")
        return None  # the statement above defines the value
    if fused.outputs:
        parts = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        names = [e.bind(parts[i], op) if i in parts else "_" for i, op in enumerate(fused.outputs)]
        e.line(f"{', '.join(names)} = {expr}{note}")
        return None
    return expr


for _fused in FUSED.values():
    register(_fused.op)(functools.partial(call, _fused))
