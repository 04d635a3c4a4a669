"""Views, indexing, concatenation: shape plumbing between the math."""

import operator
import sys

import torch
import torch.fx as fx

from lowering.ops.registry import functional, register

aten = torch.ops.aten


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def reshape(e, node, x, shape):
    return f"{e.r(x)}.reshape({e.r(list(shape))})"


@register(aten.view_as.default, aten.reshape_as.default)
def reshape_as(e, node, x, other):
    return f"{e.r(x)}.reshape({e.shape(node)})"


@register(aten.sym_size.int)
def sym_size(e, node, x, dim):
    return f"{e.r(x)}.shape[{dim}]"


@register(aten.unflatten.int)
def unflatten(e, node, x, dim, sizes):
    return f"{e.r(x)}.reshape({e.shape(node)})"


@register(aten.gather.default)
def gather(e, node, x, dim, index, sparse_grad=False):
    return f"mx.take_along_axis({e.r(x)}, {e.r(index)}, axis={dim})"


@register(aten.transpose.int)
def transpose(e, node, x, a, b):
    return f"mx.swapaxes({e.r(x)}, {a}, {b})"


@register(aten.permute.default)
def permute(e, node, x, dims):
    return f"mx.transpose({e.r(x)}, {list(dims)})"


@register(aten.t.default)
def t(e, node, x):
    return f"{e.r(x)}.T"


@register(aten.unsqueeze.default)
def unsqueeze(e, node, x, dim):
    return f"mx.expand_dims({e.r(x)}, {dim})"


@register(aten.squeeze.dim, aten.squeeze.dims)
def squeeze(e, node, x, dim):
    return f"mx.squeeze({e.r(x)}, {e.r(dim)})"


@register(aten.flatten.using_ints)
def flatten(e, node, x, start=0, end=-1):
    return f"mx.flatten({e.r(x)}, {start}, {end})"


@register(aten.expand.default, aten.expand_as.default)
def expand(e, node, x, sizes):
    return f"mx.broadcast_to({e.r(x)}, {e.shape(node)})"


@register(aten.copy.default)
def copy(e, node, dst, src, non_blocking=False):
    """The functional `dst.copy_(src)`: src's values in dst's shape and dtype."""
    return f"mx.broadcast_to({e.r(src)}, {e.shape(node)}).astype({e.dtype(node.meta['val'].dtype)})"


def _index(ndim_before: int, item: str) -> str:
    return "[" + ", ".join([":"] * ndim_before + [item]) + "]"


@register(aten.slice.Tensor)
def slice_(e, node, x, dim=0, start=None, end=None, step=1):
    dim = dim % node.meta["val"].dim()
    lo = "" if start in (None, 0) else e.r(start)
    hi = "" if end is None or (isinstance(end, int) and end >= sys.maxsize // 2) else e.r(end)
    st = "" if step == 1 else f":{step}"
    return e.r(x) + _index(dim, f"{lo}:{hi}{st}")


@register(aten.select.int)
def select(e, node, x, dim, index):
    return e.r(x) + _index(dim % (node.meta["val"].dim() + 1), e.r(index))


@register(aten.index_select.default)
def index_select(e, node, x, dim, index):
    return f"mx.take({e.r(x)}, {e.r(index)}, axis={dim})"


@register(aten.index.Tensor)
def index(e, node, x, indices):
    items = [":" if i is None else e.r(i) for i in indices]
    return f"{e.r(x)}[{', '.join(items)}]"


@register(aten.index_put_.default, aten.index_put.default)
def index_put(e, node, x, indices, values, accumulate=False):
    """x[..., idx, ...] = values with ONE index tensor (other axes whole): a scatter along that axis
    (`mx.put_along_axis`, or `.at[].add` when accumulating). The in-place form lowers when the
    target is a fresh tensor nobody reads afterwards (registry.functional)."""
    if node.target == aten.index_put_.default:
        functional(node)
    axes = [i for i, t in enumerate(indices) if t is not None]
    if len(axes) != 1:
        raise NotImplementedError(f"index_put with {len(axes)} index tensors has no MLX lowering yet")
    axis, ndim = axes[0], node.meta["val"].dim()
    if accumulate:
        return f"{e.r(x)}.at[{_index(axis, e.r(indices[axis]))[1:-1]}].add({e.r(values)})"
    shape = "(" + "".join(e.r(d) + ", " for d in node.meta["val"].shape[:axis]) + f"{e.r(indices[axis])}.shape[0], " \
        + "".join(e.r(d) + ", " for d in node.meta["val"].shape[axis + 1:]) + ")"
    idx = f"{e.r(indices[axis])}.reshape({[1] * axis + [-1] + [1] * (ndim - axis - 1)})"
    return (f"mx.put_along_axis({e.r(x)}, mx.broadcast_to({idx}, {shape}), "
            f"mx.broadcast_to({e.r(values)}, {shape}).astype({e.r(x)}.dtype), axis={axis})")


@register(aten.slice_scatter.default)
def slice_scatter(e, node, x, src, dim=0, start=None, end=None, step=1):
    """x with x[..., start:end] (on axis `dim`) replaced by src: `x[..., a:b] = src` made functional."""
    if step != 1:
        raise NotImplementedError("slice_scatter with a step has no MLX lowering yet")
    dim %= node.meta["val"].dim()
    return f"mx.slice_update({e.r(x)}, {e.r(src)}.astype({e.r(x)}.dtype), mx.array([{e.r(start or 0)}]), axes=({dim},))"


@register(aten.scatter.value, aten.scatter_.value, aten.scatter.src, aten.scatter_.src)
def scatter(e, node, x, dim, index, value):
    """x with x[i][index[i][j]] = value (or value[i][j]) along `dim`; the in-place form on a fresh tensor."""
    if node.target in (aten.scatter_.value, aten.scatter_.src):
        functional(node)
    values = e.r(value) if isinstance(value, fx.Node) else f"mx.array({e.r(value)}, dtype={e.r(x)}.dtype)"
    return f"mx.put_along_axis({e.r(x)}, {e.r(index)}, {values}, axis={dim})"


@register(aten.embedding.default)
def embedding(e, node, weight, ids, *args):
    return f"mx.take({e.r(weight)}, {e.r(ids)}, axis=0)"


@register(aten.cat.default, aten.concat.default)
def cat(e, node, tensors, dim=0):
    return f"mx.concatenate([{', '.join(e.r(t) for t in tensors)}], axis={dim})"


@register(aten.pad.default)
def pad(e, node, x, pad, mode="constant", value=None):
    if mode != "constant":
        raise NotImplementedError(f"pad mode {mode!r} has no MLX lowering yet")
    return constant_pad_nd(e, node, x, pad, value or 0)


@register(aten.constant_pad_nd.default)
def constant_pad_nd(e, node, x, pad, value=0):
    """torch's pad list runs from the last dim backwards, (before, after) each."""
    ndim = len(node.args[0].meta["val"].shape)
    widths = [(0, 0)] * ndim
    for i in range(len(pad) // 2):
        widths[ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    return f"mx.pad({e.r(x)}, {widths}, constant_values={e.r(value)})"


@register(aten.repeat.default)
def repeat(e, node, x, repeats):
    return f"mx.tile({e.r(x)}, {e.r(list(repeats))})"


@register(aten.stack.default)
def stack(e, node, tensors, dim=0):
    return f"mx.stack([{', '.join(e.r(t) for t in tensors)}], axis={dim})"


@register(aten.split_with_sizes.default, aten.split.Tensor)
def split(e, node, x, sizes, dim=0):
    total = node.args[0].meta["val"].shape[dim]
    if isinstance(sizes, int):
        sizes = [sizes] * ((total + sizes - 1) // sizes)
    cuts, acc = [], 0
    for size in sizes[:-1]:
        acc += size
        cuts.append(acc)
    return f"mx.split({e.r(x)}, {cuts}, axis={dim})"


@register(aten.chunk.default)
def chunk(e, node, x, chunks, dim=0):
    return f"mx.split({e.r(x)}, {chunks}, axis={dim})"


@register(operator.getitem)
def getitem(e, node, x, i):
    return f"{e.r(x)}[{i}]"
