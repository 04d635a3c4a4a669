"""`quantized_linear` (passes/fused/quantized.py) for a few rows of activations on MLX's CUDA backend: a GEMV
(and small-M GEMM) over weights in MLX's affine format, read once at full memory bandwidth.

Decode reads every weight once a step, so a quantized model's step time is the time to stream its packed
codes. MLX's own quantized matrix-vector product moves 4-bit weights at a third of the rate of its bf16
GEMV; this kernel is built for the stream:
- each lane loads 16 bytes of one weight row (32 codes at 4 bits, 16 at 8), a warp 512 contiguous bytes;
  a block of NW warps splits the row's K among them and holds R rows, so every activation chunk a lane
  loads serves R rows, and the R rows' loads are in flight together;
- codes become floats without integer-to-float conversions: a byte permute puts each code into the mantissa
  of a float (4 bits: 1 + q/16; 8 bits: 2^23 + q, less 2^23, exact); a 16-byte chunk lies inside one
  group (groups are 32, 64 or 128 codes), so a chunk adds `s * sum(x * q) + b * sum(x)` to the row's f32
  accumulator, and sum(x) is shared by the R rows;
- for 4 bits with float16/bfloat16 activations the code enters as 1 + q/16 (no subtraction):
  sum(x * q) = 16 * (sum(x * (1 + q/16)) - sum(x)), folded into `16 s * dot + (b - 16 s) * sum(x)`; float32
  activations take the exact form, q/16 = (1 + q/16) - 1;
- warps and then the block reduce in f32 through shuffles and shared memory; the result is rounded once to
  the activations' dtype.
Rows of activations: M from 1 to MAX_M, each a template constant (its accumulators live in registers).
"""

from __future__ import annotations

import mlx.core as mx

_SOURCE = r"""
    constexpr int CPW = 32 / BITS;                 // codes per 32-bit word
    constexpr int VALS = 4 * CPW;                  // codes per 16-byte vector
    constexpr bool EXACT = BITS == 8 || sizeof(T) == 4;
    constexpr float A = BITS == 4 ? 16.f : 1.f;    // sum(x * q) = A * dot (- A * sum(x) where not EXACT)
    constexpr float C = EXACT ? 0.f : -16.f;
    const int N = wq_shape[0];
    const int KW = wq_shape[1];                    // 32-bit words per row
    const int K = KW * CPW;
    const int VPR = KW / 4;                        // 16-byte vectors per row
    const int NG = K / GS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n0 = blockIdx.x * R;

    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    struct alignas(CPW * sizeof(T)) XVec { T v[CPW]; };   // one word's activations, one load

#pragma unroll 2
    for (int v = warp * 32 + lane; v < VPR; v += NW * 32) {
        const int g = v * VALS / GS;               // the chunk's group: a chunk never spans two
        uint4 wv[R];
        float sc[R], bi[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {              // past the last row: a harmless reload, never stored
            const size_t row = min(n0 + r, N - 1);
            wv[r] = reinterpret_cast<const uint4*>(wq + row * KW)[v];
            sc[r] = static_cast<float>(scales[row * NG + g]);
            bi[r] = static_cast<float>(biases[row * NG + g]);
        }
        float dot[M][R], xs[M];
#pragma unroll
        for (int m = 0; m < M; ++m) {
            xs[m] = 0.f;
#pragma unroll
            for (int r = 0; r < R; ++r) dot[m][r] = 0.f;
        }
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
            float f[R][CPW];                       // this word's codes of each row, as floats
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const uint32_t w = wi == 0 ? wv[r].x : wi == 1 ? wv[r].y : wi == 2 ? wv[r].z : wv[r].w;
                if (BITS == 4) {
                    // bytes 0x80 | q << 3 of the even codes and of the odd ones; a float whose top bytes are
                    // 0x3F, (0x80 | q << 3) is 1 + q / 16
                    const uint32_t ev = ((w << 3) & 0x78787878u) | 0x80808080u;
                    const uint32_t od = ((w >> 1) & 0x78787878u) | 0x80808080u;
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        f[r][2 * b] = __int_as_float(__byte_perm(ev, 0x3F00u, 0x5044u | (b << 8)));
                        f[r][2 * b + 1] = __int_as_float(__byte_perm(od, 0x3F00u, 0x5044u | (b << 8)));
                        if (EXACT) { f[r][2 * b] -= 1.f; f[r][2 * b + 1] -= 1.f; }
                    }
                } else {
                    // byte b as the low mantissa byte of 2^23: 2^23 + q, exact after the subtraction
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        f[r][b] = __int_as_float(__byte_perm(w, 0x4B00u, 0x5440u | b)) - 8388608.f;
                    }
                }
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const XVec xv = *reinterpret_cast<const XVec*>(x + (size_t)m * K + (size_t)v * VALS + wi * CPW);
                float xf[CPW];
#pragma unroll
                for (int j = 0; j < CPW; ++j) {
                    xf[j] = static_cast<float>(xv.v[j]);
                    xs[m] += xf[j];
                }
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int j = 0; j < CPW; ++j) dot[m][r] = fmaf(xf[j], f[r][j], dot[m][r]);
            }
        }
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] += A * sc[r] * dot[m][r] + (bi[r] + C * sc[r]) * xs[m];
    }

    __shared__ float part[NW][M * R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float a = acc[m][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
            if (lane == 0) part[warp][m * R + r] = a;
        }
    __syncthreads();
    if (threadIdx.x < M * R) {
        const int m = threadIdx.x / R, r = threadIdx.x % R;
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) total += part[w][threadIdx.x];
        if (n0 + r < N) out[(size_t)m * N + n0 + r] = static_cast<T>(total);
    }
"""

MAX_M = 8
BITS = (4, 8)
GROUPS = (32, 64, 128)
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)
_KERNEL = None
_SMS = 132  # multiprocessors of an H100/H200: the grid aims at a few blocks on each


def _kernel():
    global _KERNEL
    if _KERNEL is None:  # built on first use: mx.fast.cuda_kernel exists on every build, runs only on CUDA
        _KERNEL = mx.fast.cuda_kernel(
            name="quantized_gemv_v1",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["x", "wq", "scales", "biases"],
            output_names=["out"],
            source=_SOURCE,
        )
    return _KERNEL


def fits(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> bool:
    """The kernel serves this call: 4- or 8-bit codes in groups of 32/64/128, float activations of at most
    MAX_M rows whose K matches the codes, float scales and biases of one dtype."""
    if bits not in BITS or group_size not in GROUPS or x.dtype not in _FLOATS or wq.dtype != mx.uint32:
        return False
    if wq.ndim != 2 or scales.ndim != 2 or scales.shape != biases.shape or scales.dtype != biases.dtype:
        return False
    k = wq.shape[1] * 32 // bits
    return (x.ndim >= 1 and x.shape[-1] == k and k % group_size == 0 and scales.shape == (wq.shape[0], k // group_size)
            and scales.dtype in _FLOATS and 1 <= x.size // max(k, 1) <= MAX_M)


def tune_for(m: int, n: int, k: int, bits: int) -> tuple[int, int]:
    """(warps per block, rows per block): warps split K while each gets a 16-byte vector of every row; rows
    share each activation chunk a lane loads, fewer as M grows (their M x R accumulators live in registers)
    and fewer while the grid would be under four blocks a multiprocessor."""
    vectors = k * bits // 128
    warps = max(1, min(4, vectors // 32))
    rows = 4 if m <= 2 else 2 if m <= 4 else 1
    while rows > 1 and -(-n // rows) < 4 * _SMS:
        rows //= 2
    return warps, rows


def quantized_matmul(x: mx.array, wq: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int,
                     tune: tuple[int, int] | None = None) -> mx.array:
    """x [..., K] @ w.T for w [N, K] in MLX's affine format (wq uint32 [N, K * bits / 32], scales and biases
    [N, K / group_size]), accumulated in f32, in x's dtype: [..., N]. `tune`: (warps per block, rows per
    block), else `tune_for`'s."""
    k, n = x.shape[-1], wq.shape[0]
    m = x.size // k
    warps, rows = tune or tune_for(m, n, k, bits)
    out = _kernel()(
        inputs=[x.reshape(m, k), wq, scales, biases],
        template=[("T", x.dtype), ("S", scales.dtype), ("BITS", bits), ("GS", group_size), ("M", m), ("NW", warps),
                  ("R", rows)],
        grid=(-(-n // rows) * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[x.dtype],
    )[0]
    return out.reshape(*x.shape[:-1], n)
