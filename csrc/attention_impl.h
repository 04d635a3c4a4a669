// Paged decode attention, written once against the vector type V of kernels_impl.h and included
// after it by each instruction set's source file (internal linkage, no standard library).
//
// Besides kernels_impl.h's operations V provides sub(a, b), max(a, b) and min(a, b) (b returned
// where either is NaN, so NaN passes through a clamp written max(lo, x)), and pow2n(t): 2^n as a
// float, for t = n + 1.5 * 2^23 (n an integer in [-126, 127] held in t's low mantissa bits).
//
// One task: one sequence's query heads of one KV head (G = H / KVH of them) over one partition of
// its keys. The keys are taken in chunks inside one cache block (their rows are contiguous there),
// converted to float32 for 16-bit caches; each chunk updates the online softmax of every head:
// m' = max(m, max s), l' = l e^(m - m') + sum e^(s - m'), acc' = acc e^(m - m') + sum e^(s - m') v.

// e^x lane-wise (Cephes' single-precision polynomial, about 1 ulp). x is clamped to [-88, 88]:
// results below about 2^-126 (subnormal) become exactly 0, so e^-inf is 0; NaN stays NaN.
inline typename V::R vexp(typename V::R x) {
  constexpr float kMagic = 12582912.0f; // 1.5 * 2^23: adding it rounds to an integer
  x = V::max(V::set1(-88.0f), x);
  x = V::min(V::set1(88.0f), x);
  typename V::R t = V::fma(x, V::set1(1.44269504088896341f), V::set1(kMagic));
  typename V::R n = V::sub(t, V::set1(kMagic));
  typename V::R r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  typename V::R y = V::set1(1.9875691500e-4f);
  y = V::fma(y, r, V::set1(1.3981999507e-3f));
  y = V::fma(y, r, V::set1(8.3334519073e-3f));
  y = V::fma(y, r, V::set1(4.1665795894e-2f));
  y = V::fma(y, r, V::set1(1.6666665459e-1f));
  y = V::fma(y, r, V::set1(5.0000001201e-1f));
  y = V::fma(y, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::mul(y, V::pow2n(t));
}

inline float sexp(float x) {
  float buf[V::W];
  V::store(buf, vexp(V::set1(x)));
  return buf[0];
}

// rows [0, len) of D values from a cache row run, as float32: the cache itself (float32) or dst.
template <int CT>
inline const float* rows_f32(const void* src, int len, int D, float* dst) {
  if constexpr (CT == S_F32) {
    return static_cast<const float*>(src);
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(src);
    const int total = len * D;
    int i = 0;
    for (; i + V::W <= total; i += V::W) {
      V::store(dst + i, CT == S_BF16 ? V::bf16(h + i) : V::f16(h + i));
    }
    for (; i < total; ++i) {
      dst[i] = CT == S_BF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
    }
    return dst;
  }
}

// s[r * ld + j] = q_r . k_j for R heads and the chunk's len keys (two keys at a time: 2R chains).
template <int R>
inline void scores(const float* q, int D, const float* k, int len, float* s, int ld) {
  const int Dv = D - D % V::W;
  int j = 0;
  for (; j + 2 <= len; j += 2) {
    const float* k0 = k + size_t(j) * D;
    const float* k1 = k0 + D;
    typename V::R a0[R], a1[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      a0[r] = V::zero();
      a1[r] = V::zero();
    }
    for (int d = 0; d < Dv; d += V::W) {
      typename V::R kv0 = V::load(k0 + d), kv1 = V::load(k1 + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        typename V::R qv = V::load(q + r * D + d);
        a0[r] = V::fma(qv, kv0, a0[r]);
        a1[r] = V::fma(qv, kv1, a1[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float s0 = V::hsum(a0[r]), s1 = V::hsum(a1[r]);
      for (int d = Dv; d < D; ++d) {
        s0 += q[r * D + d] * k0[d];
        s1 += q[r * D + d] * k1[d];
      }
      s[r * ld + j] = s0;
      s[r * ld + j + 1] = s1;
    }
  }
  if (j < len) {
    const float* k0 = k + size_t(j) * D;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      s[r * ld + j] = dot(q + r * D, k0, D);
    }
  }
}

// acc_r = acc_r * alpha_r + sum_j p[r * ld + j] v_j for R heads, sharing each V load; two vectors
// of the head dim at a time, so 2R sums are in flight along j.
template <int R>
inline void accumulate(float* acc, int D, const float* alpha, const float* p, int ld, const float* v,
                       int len) {
  const int Dv = D - D % V::W;
  int d = 0;
  for (; d + 2 * V::W <= Dv; d += 2 * V::W) {
    typename V::R a0[R], a1[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      a0[r] = V::mul(V::load(acc + r * D + d), V::set1(alpha[r]));
      a1[r] = V::mul(V::load(acc + r * D + d + V::W), V::set1(alpha[r]));
    }
    for (int j = 0; j < len; ++j) {
      typename V::R v0 = V::load(v + size_t(j) * D + d), v1 = V::load(v + size_t(j) * D + d + V::W);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        typename V::R pj = V::set1(p[r * ld + j]);
        a0[r] = V::fma(pj, v0, a0[r]);
        a1[r] = V::fma(pj, v1, a1[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      V::store(acc + r * D + d, a0[r]);
      V::store(acc + r * D + d + V::W, a1[r]);
    }
  }
  for (; d < Dv; d += V::W) {
    typename V::R a[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      a[r] = V::mul(V::load(acc + r * D + d), V::set1(alpha[r]));
    }
    for (int j = 0; j < len; ++j) {
      typename V::R vv = V::load(v + size_t(j) * D + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        a[r] = V::fma(V::set1(p[r * ld + j]), vv, a[r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      V::store(acc + r * D + d, a[r]);
    }
  }
  for (int d = Dv; d < D; ++d) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      float x = acc[r * D + d] * alpha[r];
      for (int j = 0; j < len; ++j) {
        x += p[r * ld + j] * v[size_t(j) * D + d];
      }
      acc[r * D + d] = x;
    }
  }
}

// The next min(heads, 4) query heads: scores, then accumulation.
inline void heads_scores(int heads, const float* q, int D, const float* k, int len, float* s, int ld) {
  switch (heads) {
    case 1:
      return scores<1>(q, D, k, len, s, ld);
    case 2:
      return scores<2>(q, D, k, len, s, ld);
    case 3:
      return scores<3>(q, D, k, len, s, ld);
    default:
      return scores<4>(q, D, k, len, s, ld);
  }
}

inline void heads_accumulate(int heads, float* acc, int D, const float* alpha, const float* p, int ld,
                             const float* v, int len) {
  switch (heads) {
    case 1:
      return accumulate<1>(acc, D, alpha, p, ld, v, len);
    case 2:
      return accumulate<2>(acc, D, alpha, p, ld, v, len);
    case 3:
      return accumulate<3>(acc, D, alpha, p, ld, v, len);
    default:
      return accumulate<4>(acc, D, alpha, p, ld, v, len);
  }
}

inline float soft_cap(float s, float cap) {
  return __builtin_tanhf(s / cap) * cap;
}

template <int CT>
void attention_ct(const Attention& a, int task, float* scratch) {
  const int G = a.H / a.KVH, D = a.D, BS = a.block_size;
  const int part = task % a.parts;
  const int kvh = (task / a.parts) % a.KVH;
  const int t = task / a.parts / a.KVH;
  const int ld = (kAttnChunk + V::W - 1) / V::W * V::W + V::W; // a score row, padded for vexp
  float* kc = scratch; // [kAttnChunk][D] keys as float32
  float* vc = kc + size_t(kAttnChunk) * D; // values
  float* s = vc + size_t(kAttnChunk) * D; // [G][ld] scores, then probabilities
  float* acc = s + size_t(G) * ld; // [G][D]
  float* m = acc + size_t(G) * D; // [G] running max
  float* l = m + G; // [G] running sum
  float* alpha = l + G; // [G]
  const float* q = a.q + (size_t(t) * a.H + size_t(kvh) * G) * D;
  const float kInf = __builtin_inff();
  for (int g = 0; g < G; ++g) {
    m[g] = -kInf;
    l[g] = 0.0f;
  }
  for (int i = 0; i < G * D; ++i) {
    acc[i] = 0.0f;
  }
  const int p = a.pos[t];
  const int lo = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
  const int k0 = lo > part * a.part_keys ? lo : part * a.part_keys;
  const int k1 = min_int(p + 1, (part + 1) * a.part_keys);
  const size_t item = CT == S_F32 ? 4 : 2;
  const char* cache = static_cast<const char*>(a.cache);
  const size_t plane = size_t(a.KVH) * a.blocks * BS * D * item; // K heads, then V heads
  for (int j0 = k0; j0 < k1;) {
    const int b = j0 / BS;
    const int len = min_int(min_int(k1, (b + 1) * BS) - j0, kAttnChunk);
    const int block = a.table[size_t(t) * a.n + b];
    const char* krow = cache + ((size_t(kvh) * a.blocks + block) * BS + j0 % BS) * D * item;
    const float* k = rows_f32<CT>(krow, len, D, kc);
    const float* v = rows_f32<CT>(krow + plane, len, D, vc);
    for (int g = 0; g < G; g += 4) {
      heads_scores(G - g, q + g * D, D, k, len, s + g * ld, ld);
    }
    for (int g = 0; g < G; ++g) {
      float* sg = s + g * ld;
      if (a.cap > 0.0f) {
        for (int j = 0; j < len; ++j) {
          sg[j] = soft_cap(sg[j], a.cap);
        }
      }
      float mx = m[g];
      for (int j = 0; j < len; ++j) {
        mx = sg[j] > mx ? sg[j] : mx;
      }
      // No finite score yet (every one -inf so far): nothing to rescale, and e^(s - 0) is 0 for s = -inf.
      const bool none = mx == -kInf;
      alpha[g] = none ? 1.0f : sexp(m[g] - mx);
      typename V::R mv = V::set1(none ? 0.0f : mx), sum = V::zero();
      int j = 0;
      for (; j + V::W <= len; j += V::W) {
        typename V::R e = vexp(V::sub(V::load(sg + j), mv));
        V::store(sg + j, e);
        sum = V::add(sum, e);
      }
      float tail = 0.0f;
      if (j < len) { // the rest of the row as one padded vector; lanes past len do not count
        for (int i = len; i < j + V::W; ++i) {
          sg[i] = -kInf;
        }
        V::store(sg + j, vexp(V::sub(V::load(sg + j), mv)));
        for (; j < len; ++j) {
          tail += sg[j];
        }
      }
      l[g] = l[g] * alpha[g] + (V::hsum(sum) + tail);
      m[g] = mx;
    }
    for (int g = 0; g < G; g += 4) {
      heads_accumulate(G - g, acc + g * D, D, alpha + g, s + g * ld, ld, v, len);
    }
    j0 += len;
  }
  if (a.parts == 1) {
    float* out = a.out + (size_t(t) * a.H + size_t(kvh) * G) * D;
    for (int g = 0; g < G; ++g) {
      const float inv = 1.0f / l[g];
      for (int d = 0; d < D; ++d) {
        out[g * D + d] = acc[g * D + d] * inv;
      }
    }
  } else {
    float* pa = a.acc + size_t(task) * G * D;
    float* pml = a.ml + size_t(task) * G * 2;
    for (int i = 0; i < G * D; ++i) {
      pa[i] = acc[i];
    }
    for (int g = 0; g < G; ++g) {
      pml[2 * g] = m[g];
      pml[2 * g + 1] = l[g];
    }
  }
}

void attention(const Attention& a, int task, float* scratch) {
  switch (a.cache_type) {
    case S_F32:
      return attention_ct<S_F32>(a, task, scratch);
    case S_BF16:
      return attention_ct<S_BF16>(a, task, scratch);
    default:
      return attention_ct<S_F16>(a, task, scratch);
  }
}
