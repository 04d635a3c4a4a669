// The matmul kernels, written once against a vector type V and included by one source file per
// instruction set, inside an anonymous namespace (internal linkage; see kernels.h). No standard
// library here: its inline functions are shared across translation units.
//
// V provides (W float lanes):
//   R zero(); R load(const float*); void store(float*, R); R set1(float); R fma(R a, R b, R c)
//   (a * b + c); float hsum(R); R bf16(const uint16_t*); R f16(const uint16_t*);
//   R q4(const uint32_t*) (W 4-bit values, W / 8 words, in k order); R q8(const uint32_t*).
//
// Two shapes:
// - GEMV (M == 1): each weight is read once, so the inner loop does the least per weight. For
//   quantized weights w = s * q + b the group sum is s * (q . x) + b * sum(x): one conversion and
//   one FMA per weight; the bias term uses the group sums of x computed once per call. That
//   factorisation differs from the dequantized product only where x is not finite
//   (0 * inf), so non-finite activations take the GEMM path, which dequantizes first.
// - GEMM (M > 1): a tile of NR weight rows and p.kc columns is converted to float32 once
//   (dequantized for quantized formats) and reused by every row of x, MR rows at a time in
//   registers (MR x NR vector accumulators). Columns are taken in superblocks of NB so the output
//   tile stays in L1 across the k chunks.

constexpr int KB = 512; // GEMM k block: a multiple of every group size and of W
constexpr int NB = 48; // output columns per superblock: a multiple of every NR

inline float bits_to_float(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) {
  return bits_to_float(uint32_t(h) << 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) { // zero or subnormal: m * 2^-24
    float f = float(m) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (e == 31) {
    return bits_to_float(sign | 0x7f800000u | (m << 13));
  }
  return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline float scale_at(const void* p, int type, size_t i) {
  if (type == S_F32) {
    return static_cast<const float*>(p)[i];
  }
  if (type == S_BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

inline int min_int(int a, int b) {
  return a < b ? a : b;
}

template <int BITS>
inline V::R quant(const uint32_t* p) {
  if constexpr (BITS == 4) {
    return V::q4(p);
  } else {
    return V::q8(p);
  }
}

// ---------------------------------------------------------------- scales as float32

// dst[0:n] = the scales (or biases) p[i0:i0 + n] as float32.
inline void scales_to_f32(const void* p, int type, size_t i0, int n, float* dst) {
  int i = 0;
  if (type == S_F32) {
    const float* s = static_cast<const float*>(p) + i0;
    for (; i < n; ++i) {
      dst[i] = s[i];
    }
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(p) + i0;
  for (; i + V::W <= n; i += V::W) {
    V::store(dst + i, type == S_BF16 ? V::bf16(h + i) : V::f16(h + i));
  }
  for (; i < n; ++i) {
    dst[i] = type == S_BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
  }
}

inline float dot(const float* a, const float* b, int n) {
  typename V::R acc = V::zero();
  int i = 0;
  for (; i + V::W <= n; i += V::W) {
    acc = V::fma(V::load(a + i), V::load(b + i), acc);
  }
  float s = V::hsum(acc);
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// ---------------------------------------------------------------- GEMV, quantized

// 8-bit: W values of one row at a time (zero-extended bytes), R rows sharing each x vector.
template <int GS, int R>
void gemv_q8_rows(const Problem& p, int n, float* scratch) {
  const int G = p.K / GS;
  const size_t wpr = size_t(p.K) / 4;
  float* sc = scratch; // [R][G]
  float* bi = scratch + R * G; // [R][G]
  const uint32_t* wr[R];
  typename V::R acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    wr[r] = static_cast<const uint32_t*>(p.w) + size_t(n + r) * wpr;
    scales_to_f32(p.scales, p.scale_type, size_t(n + r) * G, G, sc + r * G);
    scales_to_f32(p.biases, p.scale_type, size_t(n + r) * G, G, bi + r * G);
    acc[r] = V::zero();
  }
  for (int g = 0; g < G; ++g) {
    typename V::R t[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      t[r] = V::zero();
    }
#pragma GCC unroll 16
    for (int c = 0; c < GS / V::W; ++c) {
      typename V::R xv = V::load(p.x + g * GS + c * V::W);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        t[r] = V::fma(V::q8(wr[r] + (g * GS + c * V::W) / 4), xv, t[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      acc[r] = V::fma(V::set1(sc[r * G + g]), t[r], acc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    p.out[n + r] = V::hsum(acc[r]) + dot(bi + r * G, p.xsum, G);
  }
}

// 4-bit: W consecutive words of a row at a time, a word a lane, in 8 passes: pass j masks nibble j
// in place, which is 16^j times its value, and multiplies it by x permuted to match and scaled by
// 16^-j (exact: a power of two). That is a mask, a conversion and an FMA per W weights, with no
// shuffles. Words past the last whole block of W take the plain path.
//
// xp[(b * 8 + j) * W + l] = x[8 * (b * W + l) + j] * 16^-j (j < 7; pass 7 shifts the nibble down).
inline void q4_permute_x(const float* x, int K, float* xp) {
  const int blocks = K / 8 / V::W;
  for (int b = 0; b < blocks; ++b) {
    for (int l = 0; l < V::W; ++l) {
      float scale = 1.0f;
      for (int j = 0; j < 8; ++j) {
        xp[(b * 8 + j) * V::W + l] = x[8 * (b * V::W + l) + j] * (j < 7 ? scale : 1.0f);
        scale *= 0.0625f;
      }
    }
  }
}

template <int GS, int R>
void gemv_q4_rows(const Problem& p, int n, const float* xp, float* scratch) {
  constexpr int PER = GS / 8; // words a group
  const int G = p.K / GS;
  const int words = p.K / 8;
  const int blocks = words / V::W;
  const int Gp = G + V::W; // room for V::spread's whole-vector loads
  float* sc = scratch; // [R][Gp]
  float* bi = scratch + R * Gp; // [R][G]
  const uint32_t* wr[R];
  typename V::R acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    wr[r] = static_cast<const uint32_t*>(p.w) + size_t(n + r) * words;
    scales_to_f32(p.scales, p.scale_type, size_t(n + r) * G, G, sc + r * Gp);
    scales_to_f32(p.biases, p.scale_type, size_t(n + r) * G, G, bi + r * G);
    acc[r] = V::zero();
  }
  for (int b = 0; b < blocks; ++b) {
    // Two partial sums a row (even and odd passes): FMA latency needs 2R independent chains.
    typename V::I v[R];
    typename V::R t0[R], t1[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      v[r] = V::words(wr[r] + b * V::W);
    }
    const float* xb = xp + b * 8 * V::W;
    {
      typename V::R x0 = V::load(xb), x1 = V::load(xb + V::W);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        t0[r] = V::mul(V::template nibble<0>(v[r]), x0);
        t1[r] = V::mul(V::template nibble<1>(v[r]), x1);
      }
    }
#define CPU_EXT_Q4_PASS(J, T)                                             \
  {                                                                       \
    typename V::R xv = V::load(xb + (J) * V::W);                          \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                 \
      T[r] = V::fma(V::template nibble<J>(v[r]), xv, T[r]);               \
    }                                                                     \
  }
    CPU_EXT_Q4_PASS(2, t0)
    CPU_EXT_Q4_PASS(3, t1)
    CPU_EXT_Q4_PASS(4, t0)
    CPU_EXT_Q4_PASS(5, t1)
    CPU_EXT_Q4_PASS(6, t0)
    CPU_EXT_Q4_PASS(7, t1)
#undef CPU_EXT_Q4_PASS
    typename V::R t[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      t[r] = V::add(t0[r], t1[r]);
    }
    const int g0 = b * V::W / PER; // group of the block's first word
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      acc[r] = V::fma(V::template spread<PER>(sc + r * Gp + g0), t[r], acc[r]);
    }
  }
  for (int w = blocks * V::W; w < words; w += V::W / 8) { // W / 8 words a vector, one group
    typename V::R xv = V::load(p.x + 8 * w);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      typename V::R qx = V::mul(V::q4(wr[r] + w), xv);
      acc[r] = V::fma(V::set1(sc[r * Gp + w / PER]), qx, acc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    p.out[n + r] = V::hsum(acc[r]) + dot(bi + r * G, p.xsum, G);
  }
}

// Scratch: the permuted x, then per row block the float32 scales and biases.
template <int BITS, int GS>
void gemv_quant(const Problem& p, int n0, int n1, float* scratch) {
  int n = n0;
  if constexpr (BITS == 4) {
    float* xp = scratch;
    float* rest = scratch + p.K;
    q4_permute_x(p.x, p.K, xp);
    for (; n + 4 <= n1; n += 4) {
      gemv_q4_rows<GS, 4>(p, n, xp, rest);
    }
    for (; n < n1; ++n) {
      gemv_q4_rows<GS, 1>(p, n, xp, rest);
    }
  } else {
    for (; n + 4 <= n1; n += 4) {
      gemv_q8_rows<GS, 4>(p, n, scratch);
    }
    for (; n < n1; ++n) {
      gemv_q8_rows<GS, 1>(p, n, scratch);
    }
  }
}

// ---------------------------------------------------------------- GEMV, dense

template <int FMT>
inline typename V::R dense_load(const void* row, int k) {
  if constexpr (FMT == W_F32) {
    return V::load(static_cast<const float*>(row) + k);
  } else if constexpr (FMT == W_BF16) {
    return V::bf16(static_cast<const uint16_t*>(row) + k);
  } else {
    return V::f16(static_cast<const uint16_t*>(row) + k);
  }
}

template <int FMT>
inline float dense_at(const void* row, int k) {
  if constexpr (FMT == W_F32) {
    return static_cast<const float*>(row)[k];
  } else if constexpr (FMT == W_BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(row)[k]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(row)[k]);
  }
}

template <int FMT>
void gemv_dense(const Problem& p, int n0, int n1) {
  constexpr int R = 4;
  constexpr size_t item = FMT == W_F32 ? 4 : 2;
  const int K = p.K;
  const int Kv = K - K % V::W; // vector part; the rest is scalar
  const char* w = static_cast<const char*>(p.w);
  const float* x = p.x;
  int n = n0;
  for (; n + R <= n1; n += R) {
    const void* wr[R];
    typename V::R acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      wr[r] = w + size_t(n + r) * K * item;
      acc[r] = V::zero();
    }
    for (int k = 0; k < Kv; k += V::W) {
      typename V::R xv = V::load(x + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r] = V::fma(dense_load<FMT>(wr[r], k), xv, acc[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float s = V::hsum(acc[r]);
      for (int k = Kv; k < K; ++k) {
        s += dense_at<FMT>(wr[r], k) * x[k];
      }
      p.out[n + r] = s;
    }
  }
  for (; n < n1; ++n) {
    const void* wr = w + size_t(n) * K * item;
    typename V::R acc = V::zero();
    for (int k = 0; k < Kv; k += V::W) {
      acc = V::fma(dense_load<FMT>(wr, k), V::load(x + k), acc);
    }
    float s = V::hsum(acc);
    for (int k = Kv; k < K; ++k) {
      s += dense_at<FMT>(wr, k) * x[k];
    }
    p.out[n] = s;
  }
}

// ---------------------------------------------------------------- weight tiles as float32

// Row n of w, columns [k0, k0 + kc), as float32 into dst, zeros up to the next multiple of W.
// Returns the row to read: dst, or w itself for float32 weights when the chunk lies inside it.
template <int FMT, int BITS, int GS>
const float* tile_row(const Problem& p, int n, int k0, int kc, float* dst) {
  const int len = (kc + V::W - 1) / V::W * V::W;
  if constexpr (FMT == W_Q4 || FMT == W_Q8) {
    // kc is a multiple of GS here, and GS of W.
    const int G = p.K / GS;
    const uint32_t* wr = static_cast<const uint32_t*>(p.w) + size_t(n) * p.K * BITS / 32;
    for (int g = k0 / GS; g < (k0 + kc) / GS; ++g) {
      size_t si = size_t(n) * G + g;
      typename V::R s = V::set1(scale_at(p.scales, p.scale_type, si));
      typename V::R b = V::set1(scale_at(p.biases, p.scale_type, si));
      float* d = dst + (g * GS - k0);
#pragma GCC unroll 16
      for (int c = 0; c < GS / V::W; ++c) {
        V::store(d + c * V::W, V::fma(quant<BITS>(wr + (g * GS + c * V::W) * BITS / 32), s, b));
      }
    }
    return dst;
  } else {
    const char* row = static_cast<const char*>(p.w) + size_t(n) * p.K * (FMT == W_F32 ? 4 : 2);
    if constexpr (FMT == W_F32) {
      if (k0 + len <= p.K) {
        return reinterpret_cast<const float*>(row) + k0;
      }
    }
    int k = 0;
    for (; k + V::W <= kc; k += V::W) {
      V::store(dst + k, dense_load<FMT>(row, k0 + k));
    }
    for (; k < kc; ++k) {
      dst[k] = dense_at<FMT>(row, k0 + k);
    }
    for (; k < len; ++k) {
      dst[k] = 0.0f;
    }
    return dst;
  }
}

// ---------------------------------------------------------------- GEMM micro-kernel

// acc[i][j] += x[i] * w[j] lane-wise over len (a multiple of W), for MR rows of x (row stride ldx)
// and NR weight rows; acc holds MR x NR vectors, row stride NR vectors.
template <int MR, int NR>
void micro(const float* x, int ldx, const float* const* w, int len, float* acc) {
  typename V::R a[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      a[i][j] = V::load(acc + (i * NR + j) * V::W);
    }
  }
  for (int k = 0; k < len; k += V::W) {
    typename V::R wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      wv[j] = V::load(w[j] + k);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      typename V::R xv = V::load(x + size_t(i) * ldx + k);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        a[i][j] = V::fma(xv, wv[j], a[i][j]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) {
      V::store(acc + (i * NR + j) * V::W, a[i][j]);
    }
  }
}

using MicroFn = void (*)(const float*, int, const float* const*, int, float*);

// micro<mr, nr> for 1 <= mr, nr <= 4.
inline MicroFn micro_fn(int mr, int nr) {
  static_assert(V::MR <= 4 && V::NR <= 4, "the micro-kernel table holds up to 4 x 4");
  static constexpr MicroFn table[4][4] = {
      {&micro<1, 1>, &micro<1, 2>, &micro<1, 3>, &micro<1, 4>},
      {&micro<2, 1>, &micro<2, 2>, &micro<2, 3>, &micro<2, 4>},
      {&micro<3, 1>, &micro<3, 2>, &micro<3, 3>, &micro<3, 4>},
      {&micro<4, 1>, &micro<4, 2>, &micro<4, 3>, &micro<4, 4>},
  };
  return table[mr - 1][nr - 1];
}

// Blocking: columns in superblocks of NB (their output rows stay in L1), k in chunks of p.kc (the
// x rows over a chunk stay in L2), each chunk in blocks of KB (a weight tile and MR rows of x stay
// in L1). A tile's weight rows are read in runs of p.kc, which the hardware prefetcher follows.
template <int FMT, int BITS, int GS>
void gemm(const Problem& p, int n0, int n1, float* scratch) {
  constexpr int NR = V::NR, MR = V::MR;
  float* tile = scratch; // [NR][KB]
  float* acc = scratch + 4 * KB; // [M][NR] vectors
  const float* rows[NR];
  const int M = p.M, K = p.K;
  for (int nb = n0; nb < n1; nb += NB) {
    const int nbe = min_int(nb + NB, n1);
    for (int m = 0; m < M; ++m) {
      for (int n = nb; n < nbe; ++n) {
        p.out[size_t(m) * p.ldo + n] = 0.0f;
      }
    }
    for (int k2 = 0; k2 < K; k2 += p.kc) {
      const int k2e = min_int(k2 + p.kc, K);
      for (int n = nb; n < nbe; n += NR) {
        const int nr = min_int(NR, nbe - n);
        for (int i = 0; i < M * nr * V::W; ++i) {
          acc[i] = 0.0f;
        }
        MicroFn full = micro_fn(MR, nr);
        MicroFn tail = M % MR ? micro_fn(M % MR, nr) : nullptr;
        for (int k1 = k2; k1 < k2e; k1 += KB) {
          const int kb = min_int(KB, k2e - k1);
          const int len = (kb + V::W - 1) / V::W * V::W;
          for (int j = 0; j < nr; ++j) {
            rows[j] = tile_row<FMT, BITS, GS>(p, n + j, k1, kb, tile + j * KB);
          }
          int m = 0;
          for (; m + MR <= M; m += MR) {
            full(p.x + size_t(m) * p.ldx + k1, p.ldx, rows, len, acc + size_t(m) * nr * V::W);
          }
          if (tail) {
            tail(p.x + size_t(m) * p.ldx + k1, p.ldx, rows, len, acc + size_t(m) * nr * V::W);
          }
        }
        for (int m = 0; m < M; ++m) {
          for (int j = 0; j < nr; ++j) {
            p.out[size_t(m) * p.ldo + n + j] += V::hsum(V::load(acc + (size_t(m) * nr + j) * V::W));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- entry points

template <int FMT, int BITS, int GS>
void matmul_fmt(const Problem& p, int n0, int n1, float* scratch) {
  if (p.M == 1) {
    if constexpr (FMT == W_Q4 || FMT == W_Q8) {
      if (p.x_finite) {
        gemv_quant<BITS, GS>(p, n0, n1, scratch);
        return;
      }
    } else {
      gemv_dense<FMT>(p, n0, n1);
      return;
    }
  }
  gemm<FMT, BITS, GS>(p, n0, n1, scratch);
}

template <int BITS>
void matmul_bits(const Problem& p, int n0, int n1, float* scratch) {
  constexpr int FMT = BITS == 4 ? W_Q4 : W_Q8;
  switch (p.group) {
    case 32:
      return matmul_fmt<FMT, BITS, 32>(p, n0, n1, scratch);
    case 64:
      return matmul_fmt<FMT, BITS, 64>(p, n0, n1, scratch);
    default:
      return matmul_fmt<FMT, BITS, 128>(p, n0, n1, scratch);
  }
}

void matmul(const Problem& p, int n0, int n1, float* scratch) {
  switch (p.format) {
    case W_F32:
      return matmul_fmt<W_F32, 0, 0>(p, n0, n1, scratch);
    case W_BF16:
      return matmul_fmt<W_BF16, 0, 0>(p, n0, n1, scratch);
    case W_F16:
      return matmul_fmt<W_F16, 0, 0>(p, n0, n1, scratch);
    case W_Q4:
      return matmul_bits<4>(p, n0, n1, scratch);
    default:
      return matmul_bits<8>(p, n0, n1, scratch);
  }
}

template <int BITS, int GS>
void dequantize_rows(const Problem& p, int n0, int n1, float* dst, size_t ld) {
  constexpr int FMT = BITS == 4 ? W_Q4 : W_Q8;
  for (int n = n0; n < n1; ++n) {
    for (int k0 = 0; k0 < p.K; k0 += KB) {
      tile_row<FMT, BITS, GS>(p, n, k0, min_int(KB, p.K - k0), dst + size_t(n) * ld + k0);
    }
  }
}

template <int BITS>
void dequantize_bits(const Problem& p, int n0, int n1, float* dst, size_t ld) {
  switch (p.group) {
    case 32:
      return dequantize_rows<BITS, 32>(p, n0, n1, dst, ld);
    case 64:
      return dequantize_rows<BITS, 64>(p, n0, n1, dst, ld);
    default:
      return dequantize_rows<BITS, 128>(p, n0, n1, dst, ld);
  }
}

void dequantize(const Problem& p, int n0, int n1, float* dst, size_t ld) {
  if (p.format == W_Q4) {
    dequantize_bits<4>(p, n0, n1, dst, ld);
  } else {
    dequantize_bits<8>(p, n0, n1, dst, ld);
  }
}
