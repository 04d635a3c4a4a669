// Checks every kernel set this CPU runs (matmul and paged decode attention) against a float64
// reference, without MLX or Python, and times the matmuls: a way to test the AVX-512 kernels on a
// machine that has AVX-512 but no MLX.
//   cmake -S csrc -B build/check -DCPU_EXT_KERNEL_CHECK=ON -DCMAKE_EXE_LINKER_FLAGS=-static
//   cmake --build build/check && build/check/kernel_check      (exit status 1 on any mismatch)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

using namespace cpu_ext;

namespace {

bool supported(const KernelSet* ks) {
  if (ks == &kernels_generic) {
    return true;
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c");
  if (ks == &kernels_avx2) {
    return avx2;
  }
  if (ks == &kernels_avx512) {
    return avx2 && __builtin_cpu_supports("avx512f");
  }
#endif
  return false;
}

uint16_t to_bf16(float f) { // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t to_f16(float f) { // normal range only, truncating: the values used here are exact
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int e = int((u >> 23) & 0xff) - 127 + 15;
  if (e <= 0) {
    return uint16_t(sign);
  }
  return uint16_t(sign | (uint32_t(e) << 10) | ((u >> 13) & 0x3ffu));
}

float from_f16(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t u = e == 0 ? sign : sign | ((e + 112) << 23) | (m << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Case {
  int M, N, K, format, bits, group, scale_type;
};

std::mt19937 rng(1234);

// Returns the max of |got - want| / allowed over the outputs (<= 1 passes).
double run_case(const KernelSet* ks, const Case& c, double* seconds) {
  std::normal_distribution<float> normal;
  const int ldx = (c.K + kPad - 1) / kPad * kPad;
  std::vector<float> x(size_t(c.M) * ldx, 0.0f);
  for (int m = 0; m < c.M; ++m) {
    for (int k = 0; k < c.K; ++k) {
      x[size_t(m) * ldx + k] = normal(rng);
    }
  }
  std::vector<double> w(size_t(c.N) * c.K); // the reference weights
  std::vector<uint32_t> words;
  std::vector<uint16_t> dense16, s16, b16;
  std::vector<float> dense32, s32, b32;
  std::vector<float> xsum;
  const bool quantized = c.format == W_Q4 || c.format == W_Q8;
  if (quantized) {
    const int G = c.K / c.group, per = 32 / c.bits;
    words.assign(size_t(c.N) * c.K / per, 0);
    s32.resize(size_t(c.N) * G);
    b32.resize(size_t(c.N) * G);
    for (size_t i = 0; i < s32.size(); ++i) {
      float s = 0.01f * float(1 + rng() % 64), b = -0.25f * float(rng() % 16);
      if (c.scale_type == S_BF16) {
        s = from_bf16(to_bf16(s));
        b = from_bf16(to_bf16(b));
      } else if (c.scale_type == S_F16) {
        s = from_f16(to_f16(s));
        b = from_f16(to_f16(b));
      }
      s32[i] = s;
      b32[i] = b;
    }
    for (int n = 0; n < c.N; ++n) {
      for (int k = 0; k < c.K; ++k) {
        uint32_t q = rng() & ((1u << c.bits) - 1);
        words[(size_t(n) * c.K + k) / per] |= q << (c.bits * (k % per));
        size_t g = size_t(n) * G + k / c.group;
        w[size_t(n) * c.K + k] = double(s32[g]) * q + double(b32[g]);
      }
    }
    if (c.scale_type != S_F32) {
      for (float v : s32) {
        s16.push_back(c.scale_type == S_BF16 ? to_bf16(v) : to_f16(v));
      }
      for (float v : b32) {
        b16.push_back(c.scale_type == S_BF16 ? to_bf16(v) : to_f16(v));
      }
    }
    xsum.resize(size_t(c.M) * G);
    for (int m = 0; m < c.M; ++m) {
      for (int g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int k = 0; k < c.group; ++k) {
          s += x[size_t(m) * ldx + g * c.group + k];
        }
        xsum[size_t(m) * G + g] = s;
      }
    }
  } else {
    for (size_t i = 0; i < w.size(); ++i) {
      float v = normal(rng);
      if (c.format == W_F32) {
        dense32.push_back(v);
      } else {
        uint16_t h = c.format == W_BF16 ? to_bf16(v) : to_f16(v);
        dense16.push_back(h);
        v = c.format == W_BF16 ? from_bf16(h) : from_f16(h);
      }
      w[i] = v;
    }
  }
  std::vector<float> out(size_t(c.M) * c.N, -1.0f);
  Problem p{};
  p.M = c.M;
  p.N = c.N;
  p.K = c.K;
  p.x = x.data();
  p.ldx = ldx;
  p.xsum = xsum.data();
  p.x_finite = true;
  p.format = c.format;
  p.w = quantized ? static_cast<const void*>(words.data())
      : c.format == W_F32 ? static_cast<const void*>(dense32.data())
                          : static_cast<const void*>(dense16.data());
  p.scales = c.scale_type == S_F32 ? static_cast<const void*>(s32.data()) : s16.data();
  p.biases = c.scale_type == S_F32 ? static_cast<const void*>(b32.data()) : b16.data();
  p.scale_type = c.scale_type;
  p.group = c.group;
  p.out = out.data();
  p.ldo = c.N;
  p.kc = gemm_kc(c.M);
  std::vector<float> scratch(scratch_floats(p));
  // Uneven column ranges, as threads take them.
  int cut1 = c.N / 3, cut2 = c.N - c.N / 5;
  auto t0 = std::chrono::steady_clock::now();
  ks->matmul(p, 0, cut1, scratch.data());
  ks->matmul(p, cut1, cut2, scratch.data());
  ks->matmul(p, cut2, c.N, scratch.data());
  *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double worst = 0.0;
  for (int m = 0; m < c.M; ++m) {
    for (int n = 0; n < c.N; ++n) {
      double want = 0.0, mag = 0.0;
      for (int k = 0; k < c.K; ++k) {
        double t = double(x[size_t(m) * ldx + k]) * w[size_t(n) * c.K + k];
        want += t;
        mag += std::fabs(t);
      }
      double allowed = 1e-5 + 1.3e-6 * std::fabs(want) + 16 * std::ldexp(1.0, -24) * mag;
      double ratio = std::fabs(double(out[size_t(m) * c.N + n]) - want) / allowed;
      worst = std::isnan(ratio) ? 1e30 : std::max(worst, ratio);
    }
  }
  if (quantized) { // dequantize too
    std::vector<float> dq(size_t(c.N) * c.K);
    ks->dequantize(p, 0, c.N, dq.data(), size_t(c.K));
    for (size_t i = 0; i < dq.size(); ++i) {
      double ratio = std::fabs(dq[i] - w[i]) / (1e-6 + 4 * std::ldexp(1.0, -24) * std::fabs(w[i]));
      worst = std::max(worst, ratio);
    }
  }
  return worst;
}


// Paged decode attention, one partition: T sequences of contexts 1.., blocks scattered over the
// cache; returns the max of |got - want| / allowed.
double attention_case(const KernelSet* ks, int KVH, int G, int D, int BS, int cache_type, int window,
                      float cap) {
  const int contexts[] = {1, 2, BS, BS + 1, 70, 300};
  const int T = 6, H = KVH * G;
  int n = 0, total = 0;
  for (int c : contexts) {
    n = std::max(n, (c + BS - 1) / BS);
    total += (c + BS - 1) / BS;
  }
  const int NB = total + 2;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  size_t elems = size_t(2) * KVH * NB * BS * D;
  std::vector<float> cache(elems);
  std::vector<uint16_t> half(elems);
  for (size_t i = 0; i < elems; ++i) {
    float f = normal(rng);
    half[i] = cache_type == S_BF16 ? to_bf16(f) : to_f16(f);
    cache[i] = cache_type == S_F32 ? f : cache_type == S_BF16 ? from_bf16(half[i]) : from_f16(half[i]);
  }
  std::vector<int32_t> perm(NB), table(size_t(T) * n, 0), pos(T);
  for (int i = 0; i < NB; ++i) {
    perm[i] = i;
  }
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int t = 0, at = 0; t < T; ++t) {
    for (int b = 0; b < (contexts[t] + BS - 1) / BS; ++b) {
      table[size_t(t) * n + b] = perm[at++];
    }
    pos[t] = contexts[t] - 1;
  }
  const float scale = 1.0f / std::sqrt(float(D));
  std::vector<float> q(size_t(T) * H * D), out(size_t(T) * H * D);
  for (auto& x : q) {
    x = normal(rng) * scale * (cap > 0 ? 8.0f : 1.0f);
  }
  Attention a{};
  a.T = T;
  a.H = H;
  a.KVH = KVH;
  a.D = D;
  a.q = q.data();
  a.cache = cache_type == S_F32 ? static_cast<const void*>(cache.data()) : half.data();
  a.cache_type = cache_type;
  a.blocks = NB;
  a.block_size = BS;
  a.table = table.data();
  a.n = n;
  a.pos = pos.data();
  a.window = window;
  a.cap = cap;
  a.parts = 1;
  a.part_keys = 300;
  a.out = out.data();
  std::vector<float> scratch(attention_scratch_floats(a));
  for (int task = 0; task < T * KVH; ++task) {
    ks->attention(a, task, scratch.data());
  }
  double worst = 0.0;
  const size_t plane = size_t(KVH) * NB * BS * D;
  for (int t = 0; t < T; ++t) {
    int lo = window > 0 ? std::max(0, pos[t] - window + 1) : 0;
    for (int h = 0; h < H; ++h) {
      int kvh = h / G;
      std::vector<double> s;
      double mx = -1e300;
      for (int j = lo; j <= pos[t]; ++j) {
        size_t row = ((size_t(kvh) * NB + table[size_t(t) * n + j / BS]) * BS + j % BS) * D;
        double dot = 0.0;
        for (int d = 0; d < D; ++d) {
          dot += double(q[(size_t(t) * H + h) * D + d]) * cache[row + d];
        }
        if (cap > 0) {
          dot = std::tanh(dot / cap) * cap;
        }
        s.push_back(dot);
        mx = std::max(mx, dot);
      }
      double l = 0.0;
      for (auto& x : s) {
        x = std::exp(x - mx);
        l += x;
      }
      for (int d = 0; d < D; ++d) {
        double want = 0.0, mag = 0.0;
        for (int j = lo; j <= pos[t]; ++j) {
          size_t row = ((size_t(kvh) * NB + table[size_t(t) * n + j / BS]) * BS + j % BS) * D;
          want += s[j - lo] / l * cache[plane + row + d];
          mag += s[j - lo] / l * std::fabs(cache[plane + row + d]);
        }
        double got = out[(size_t(t) * H + h) * D + d];
        double allowed = 1e-6 + 2e-6 * mag * (8 + 2 * std::sqrt(double(D)));
        worst = std::max(worst, std::isnan(got) ? 1e9 : std::fabs(got - want) / allowed);
      }
    }
  }
  return worst;
}

} // namespace

int main() {
  const KernelSet* sets[] = {
#if defined(__x86_64__)
      &kernels_avx512,
      &kernels_avx2,
#endif
      &kernels_generic};
  int failures = 0, cases = 0;
  for (const KernelSet* ks : sets) {
    if (!supported(ks)) {
      std::printf("%-8s not supported by this CPU: skipped\n", ks->name);
      continue;
    }
    double slowest = 0.0;
    for (int format : {W_F32, W_BF16, W_F16, W_Q4, W_Q8}) {
      bool quantized = format == W_Q4 || format == W_Q8;
      for (int group : quantized ? std::vector<int>{32, 64, 128} : std::vector<int>{0}) {
        for (int st : quantized ? std::vector<int>{S_F32, S_BF16, S_F16} : std::vector<int>{S_F32}) {
          for (int M : {1, 2, 3, 5, 8, 13, 64}) {
            for (int K : quantized ? std::vector<int>{group * 3, group * 33, 32 * 131}
                                   : std::vector<int>{1, 77, 512, 1031}) {
              Case c{M, 37, K, format, format == W_Q8 ? 8 : 4, quantized ? group : 32, st};
              if (quantized && K % group != 0) {
                continue;
              }
              double secs = 0.0;
              double worst = run_case(ks, c, &secs);
              slowest = std::max(slowest, secs);
              ++cases;
              if (!(worst <= 1.0)) {
                ++failures;
                std::printf("FAIL %s format %d bits %d group %d scales %d M=%d N=%d K=%d: error %.3g x allowed\n",
                            ks->name, c.format, c.bits, c.group, c.scale_type, c.M, c.N, c.K, worst);
              }
            }
          }
        }
      }
    }
    for (int ct : {S_F32, S_BF16, S_F16}) {
      for (int D : {1, 17, 64, 128}) {
        for (int G : {1, 3, 4, 7}) {
          for (int BS : {1, 16, 100}) {
            for (auto wc : {std::pair<int, float>{-1, 0.0f}, {33, 0.0f}, {-1, 20.0f}}) {
              double worst = attention_case(ks, 2, G, D, BS, ct, wc.first, wc.second);
              ++cases;
              if (!(worst <= 1.0)) {
                ++failures;
                std::printf("FAIL %s attention cache %d D=%d G=%d block %d window %d cap %g: error %.3g x allowed\n",
                            ks->name, ct, D, G, BS, wc.first, wc.second, worst);
              }
            }
          }
        }
      }
    }
    std::printf("%-8s checked\n", ks->name);
  }
  // Throughput, one thread, weights resident in cache: 4096 x 1024 q4 / bf16, M = 1 and 8.
  for (const KernelSet* ks : sets) {
    if (!supported(ks)) {
      continue;
    }
    for (int format : {W_Q4, W_Q8, W_BF16, W_F32}) {
      for (int M : {1, 8}) {
        Case c{M, 1024, 4096, format, format == W_Q8 ? 8 : 4, 64, S_BF16};
        double best = 1e9, secs = 0.0;
        for (int r = 0; r < 5; ++r) {
          run_case(ks, c, &secs);
          best = std::min(best, secs);
        }
        std::printf("%-8s format %d M=%d 1024x4096: %.3f ms, %.1f GFLOP/s\n", ks->name, format, M,
                    best * 1e3, 2.0 * M * 1024 * 4096 / best / 1e9);
      }
    }
  }
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
