"""CPU kernels for MLX: quantized (affine 4/8-bit) and float32/bfloat16/float16 matmul, paged decode attention.

The kernels are C++ (csrc/), compiled by pip at install time into `runtime._cpu_ext`, a module of
MLX custom primitives: every function here returns a lazy MLX array that composes with the rest
of the graph and with `mx.compile`; the work runs on MLX's CPU stream when the graph is evaluated.

- `quantized_matmul(x, w, scales, biases, group_size, bits)`: `x @ dequantize(w).T` on MLX's affine
  layout exactly as `mx.quantize` makes it, float32 accumulation. Up to `GEMM_MAX_M` rows of x
  run in the kernel (GEMV and small-M GEMM); more rows dequantize the weights to float32 in tiles
  of `TILE_ROWS` and multiply with MLX's matmul (the BLAS), which is faster there.
- `linear(x, w)`: `x @ w.T` for float32, bfloat16 or float16 weights, float32 accumulation.
- `dequantize(w, scales, biases, group_size, bits)`: the float32 weights.
- `paged_decode_attention(q, cache, blocks, pos, scale, window, cap)`: one query token per sequence
  against its keys in the paged K/V cache, read in place through the block table (no gather copy).

Kernels are vectorised for AVX-512 or AVX2 (chosen at run time from the CPU; `isa()`), with a
portable fallback, and threaded over output columns on one pool of `num_threads()` threads, the
MLX stream's own thread included (default: the CPUs this process may run on).
"""

from __future__ import annotations

import mlx.core as mx


class _Unavailable:
    """Stands in for the compiled module where it was not built (a source checkout run as it is, as the GPU
    suite runs one): the GPU tables never call it, and any use says what is missing and how to build it."""

    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name: str):
        raise ImportError(
            f"runtime._cpu_ext (the compiled CPU kernels) cannot be imported ({self.reason}); pip builds it when "
            "the project is installed: run ./setup.sh or `pip install -e .` again"
        )


try:
    from runtime import _cpu_ext as _ext
except ImportError as exc:  # depends on the install
    _ext = _Unavailable(str(exc))


def require() -> None:
    """Raise ImportError, saying how to build it, when the compiled module is missing."""
    if isinstance(_ext, _Unavailable):
        _ext.isa  # noqa: B018 - raises the ImportError


BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = (mx.float32, mx.bfloat16, mx.float16)

# Rows of x up to which the quantized kernel runs; above, dequantized tiles + MLX's matmul (OpenBLAS),
# which overtakes the kernel between 128 and 256 rows on a 2-core AVX2 machine (docs/benchmarks.md).
GEMM_MAX_M = 192
TILE_ROWS = 4096  # weight rows dequantized at a time above GEMM_MAX_M


def _check_array(op: str, name: str, a) -> None:
    if not isinstance(a, mx.array):
        raise TypeError(f"cpu_ext.{op}: {name} must be an mlx.core.array, got {type(a).__name__}")


def _check_int(op: str, name: str, value, allowed: tuple[int, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"cpu_ext.{op}: {name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _check_quantized(op: str, w, scales, biases, group_size, bits) -> None:
    for name, a in (("w", w), ("scales", scales), ("biases", biases)):
        _check_array(op, name, a)
    _check_int(op, "group_size", group_size, GROUP_SIZES)
    _check_int(op, "bits", bits, BITS)


def _rows(x: mx.array) -> int:
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return m


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64, bits: int = 4
) -> mx.array:
    """`x[..., K] @ dequantize(w, scales, biases).T -> [..., N]` (what `mx.quantized_matmul` computes
    with `transpose=True`), float32 accumulation, in the dtype `mx.quantized_matmul` gives.

    `w`: uint32 `[N, K * bits / 32]`; `scales`, `biases`: `[N, K / group_size]`, one float dtype.
    K must be a multiple of `group_size` (MLX's layout has no partial groups).
    """
    op = "quantized_matmul"
    _check_array(op, "x", x)
    _check_quantized(op, w, scales, biases, group_size, bits)
    if x.ndim >= 1 and _rows(x) > GEMM_MAX_M and x.dtype in FLOAT_DTYPES:
        return _quantized_matmul_tiled(x, w, scales, biases, group_size, bits)
    return _ext.quantized_matmul(x, w, scales, biases, group_size, bits)


def _quantized_matmul_tiled(x, w, scales, biases, group_size, bits) -> mx.array:
    """Many rows: float32 weights a tile of rows at a time, multiplied by the BLAS."""
    n = w.shape[0]
    out_dtype = x.dtype if x.dtype == scales.dtype else mx.float32  # MLX's promotion of two float dtypes
    xf = x.astype(mx.float32)
    parts = []
    for start in range(0, n, TILE_ROWS):
        stop = min(start + TILE_ROWS, n)
        tile = _ext.dequantize(w[start:stop], scales[start:stop], biases[start:stop], group_size, bits)
        parts.append(xf @ tile.T)
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    return y.astype(out_dtype)


def linear(x: mx.array, w: mx.array) -> mx.array:
    """`x[..., K] @ w[N, K].T -> [..., N]` for float32, bfloat16 or float16 `w` (and x), float32
    accumulation, in the dtype `mx.matmul` gives."""
    _check_array("linear", "x", x)
    _check_array("linear", "w", w)
    return _ext.linear(x, w)


def dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 64, bits: int = 4) -> mx.array:
    """The float32 matrix `[N, K]` that `w`, `scales` and `biases` encode (`scales * q + biases`)."""
    _check_quantized("dequantize", w, scales, biases, group_size, bits)
    return _ext.dequantize(w, scales, biases, group_size, bits)


def paged_decode_attention(q: mx.array, cache: mx.array, blocks: mx.array, pos: mx.array, *, scale: float,
                           window: int = -1, cap: float = 0.0) -> mx.array:
    """Decode attention of q [T, H, D] (one query token per sequence) over the layer's paged cache
    [2, KVH, blocks, block_size, D] (K, then V), read in place through the block table `blocks` [T, n]
    (int32: the cache block holding keys i * block_size ... of sequence t at [t, i]).

    Sequence t attends to keys 0..pos[t] (`pos`: int32 [T] or [T, 1]), only the last `window` of them when
    window > 0; query head h reads KV head h // (H / KVH) (GQA). Scores are q.k * scale, soft-capped to
    cap * tanh(s / cap) when cap > 0; softmax and sums in float32. Returns [T, H * D] in q's dtype. A
    sequence whose keys the table does not cover (a position < 0 or past n * block_size, a block id outside
    the cache) gets NaN rather than a read out of bounds.
    """
    op = "paged_decode_attention"
    for name, a in (("q", q), ("cache", cache), ("blocks", blocks), ("pos", pos)):
        _check_array(op, name, a)
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"cpu_ext.{op}: window must be an int (<= 0: no window), got {window!r}")
    return _ext.paged_decode_attention(q, cache, blocks, pos, float(scale), window, float(cap))


def num_threads() -> int:
    """Threads each kernel runs on, MLX's CPU stream thread included."""
    return _ext.num_threads()


def default_num_threads() -> int:
    """The default thread count: the CPUs in this process's affinity mask at first use."""
    return _ext.default_num_threads()


def set_num_threads(n: int | None) -> None:
    """Run kernels on `n` threads (1: on MLX's stream thread alone); None restores the default."""
    if n is None:
        _ext.set_num_threads(0)
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cpu_ext.set_num_threads: n must be a positive int or None, got {n!r}")
    _ext.set_num_threads(n)


def isa() -> str:
    """The kernel set in use: "avx512", "avx2" or "generic"."""
    return _ext.isa()


def supported_isas() -> tuple[str, ...]:
    """The kernel sets this CPU can run, best first."""
    return tuple(_ext.supported_isas())


def set_isa(name: str) -> None:
    """Use the named kernel set (one of `supported_isas()`); tests and benchmarks compare them."""
    if not isinstance(name, str):
        raise TypeError(f"cpu_ext.set_isa: name must be a str, got {type(name).__name__}")
    _ext.set_isa(name)
